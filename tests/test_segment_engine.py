"""The segmentation engine on synthetic and real rasters, with models whose answer is known."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers import (
    SAMPLE_DATA,
    PerPixelModel,
    per_pixel_spec,
    random_scene,
    write_tif,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, from_origin

from crossearth_cli.engine import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, SegmentSettings, segment


def reference_per_pixel(module: torch.nn.Module, img_u8: np.ndarray) -> np.ndarray:
    """Class probabilities of the per-pixel model on the whole image at once."""
    x = torch.from_numpy(img_u8.astype(np.float32))[None]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        s = module((x - mean) / std)[0]
    return (s / s.sum(0, keepdim=True)).numpy()


def run(tmp_path, img, spec, name="scene", **kw) -> tuple[np.ndarray, np.ndarray | None, Path]:
    src = write_tif(tmp_path / f"{name}.tif", img, **kw.pop("tif", {}))
    out = tmp_path / f"{name}_classes.tif"
    probs = tmp_path / f"{name}_probs.tif"
    segment(
        SegmentSettings(
            input=src, output=out, probabilities=probs, probabilities_dtype="float32",
            overwrite=True, **kw,
        ),
        spec,
    )
    with rasterio.open(out) as ds:
        classes = ds.read(1)
    with rasterio.open(probs) as ds:
        p = ds.read()
    return classes, p, out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    h=st.integers(1, 150),
    w=st.integers(1, 150),
    tile=st.integers(16, 96),
    frac=st.floats(0.1, 1.0),
    blend=st.sampled_from(["gaussian", "cosine", "mean"]),
    batch=st.integers(1, 5),
)
def test_tiling_a_per_pixel_model_equals_the_whole_image(tmp_path, h, w, tile, frac, blend, batch):
    """Seams, scene borders, scenes smaller than a tile or not divisible by the stride."""
    stride = max(1, int(tile * frac))
    spec = per_pixel_spec(num_classes=4, crop=tile, stride=stride)
    img = random_scene(h, w, seed=h * 1000 + w)
    classes, probs, _ = run(tmp_path, img, spec, blend=blend, batch_size=batch)
    ref = reference_per_pixel(spec.module, img)
    np.testing.assert_allclose(probs, ref, atol=2e-6)
    top2 = np.sort(ref, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-5
    assert (classes[decided] == ref.argmax(0)[decided]).all()


class ContextModel(torch.nn.Module):
    """Scores depend on the whole tile (its mean) and on neighbours: tiling matters."""

    def __init__(self, num_classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = torch.nn.Conv2d(3, num_classes, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)

    def forward(self, x):
        s = self.conv(x) + x.mean(dim=(1, 2, 3), keepdim=True) * 2
        return torch.nn.functional.softplus(s)


def mmseg_slide_inference(module, img: torch.Tensor, crop: int, stride: int, num_classes: int):
    """Transcription of mmseg 1.x EncoderDecoder.slide_inference on a full canvas."""
    batch_size, _, h_img, w_img = img.size()
    h_stride = w_stride = stride
    h_crop = w_crop = crop
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = module(crop_img)
            preds += torch.nn.functional.pad(
                crop_seg_logit,
                (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)),
            )
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


@pytest.mark.parametrize(
    "h,w,crop,stride", [(300, 257, 96, 64), (130, 90, 64, 41), (50, 200, 64, 64)]
)
def test_blend_mean_reproduces_mmseg_slide_inference(tmp_path, h, w, crop, stride):
    module = ContextModel(3)
    spec = ModelSpec(module=module, class_names=["a", "b", "c"], crop=crop, stride=stride)
    img = random_scene(h, w, seed=3)
    classes, probs, _ = run(tmp_path, img, spec, blend="mean", batch_size=3)
    x = torch.from_numpy(img.astype(np.float32))[None]
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        seg = mmseg_slide_inference(module, x, crop, stride, 3)[0]
    ref_probs = (seg / seg.sum(0, keepdim=True)).numpy()
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    assert (classes == seg.argmax(0).numpy()).mean() > 0.9999


def test_georeferencing_is_copied_exactly(tmp_path):
    spec = per_pixel_spec()
    img = random_scene(70, 90)
    rotated = Affine(0.4, 0.2, 600000.0, 0.15, -0.45, 5200000.0)
    for name, crs, transform in [
        ("rotated", CRS.from_epsg(32633), rotated),
        ("geographic", CRS.from_epsg(4326), from_origin(13.4, 52.5, 1e-5, 1e-5)),
    ]:
        src = write_tif(tmp_path / f"{name}.tif", img, crs=crs, transform=transform)
        out = tmp_path / f"{name}_out.tif"
        segment(SegmentSettings(input=src, output=out), spec)
        with rasterio.open(src) as a, rasterio.open(out) as b:
            assert b.crs == a.crs
            assert b.transform == a.transform
            assert (b.height, b.width) == (a.height, a.width)
            assert b.dtypes[0] == "uint8" and b.nodata == 255
            assert b.profile["tiled"] and b.profile["compress"] == "deflate"


def test_no_crs_works_and_output_has_none(tmp_path):
    spec = per_pixel_spec()
    src = write_tif(tmp_path / "nocrs.tif", random_scene(40, 40), crs=None,
                    transform=Affine(1, 0, 100, 0, -1, 200))
    out = tmp_path / "nocrs_out.tif"
    notes = []
    segment(SegmentSettings(input=src, output=out), spec,
            events=lambda k, d: notes.append(d) if k == "note" else None)
    assert any("no CRS" in n["message"] for n in notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(out) as b:
            assert b.crs is None
            assert b.transform == Affine(1, 0, 100, 0, -1, 200)


def _expected(spec, img):
    return reference_per_pixel(spec.module, img).argmax(0).astype(np.uint8)


def test_every_kind_of_nodata_becomes_255_and_class_0_stays_0(tmp_path):
    spec = per_pixel_spec(num_classes=4, crop=32, stride=24)
    h = w = 64
    img = random_scene(h, w, seed=7)
    expected = _expected(spec, img)
    assert (expected == 0).sum() > 50, "test needs real class-0 pixels"
    hole = np.zeros((h, w), bool)
    hole[10:20, 5:40] = True
    hole[50:, 50:] = True

    cases = {}
    # 1. nodata value 0 alongside real zeros: only pixels that are 0 in every band are nodata
    a = img.copy()
    a[:, hole] = 0
    a[0, 30:34, :] = 0  # a real zero in one band stays data
    assert ((a == 0).all(axis=0) == hole).all()
    cases["value"] = dict(img=a, tif=dict(nodata=0), expected=_expected(spec, a))
    # 2. NaN in float data
    f = img.astype(np.float32)
    f[1, hole] = np.nan
    cases["nan"] = dict(img=f, tif=dict(), range="0,255")
    # 3. alpha band
    alpha = np.where(hole, 0, 255).astype(np.uint8)
    cases["alpha"] = dict(img=np.concatenate([img, alpha[None]]), tif=dict(photometric="RGB",
                          alpha="YES"))
    for name, case in cases.items():
        src = write_tif(tmp_path / f"{name}.tif", case["img"], **case["tif"])
        out = tmp_path / f"{name}_out.tif"
        from crossearth_cli.raster.reader import parse_range

        segment(SegmentSettings(input=src, output=out, value_range=parse_range(
            case.get("range"), 3)), spec)
        with rasterio.open(out) as ds:
            got = ds.read(1)
        assert (got[hole] == 255).all(), name
        want = case.get("expected", expected)
        np.testing.assert_array_equal(got[~hole], want[~hole], err_msg=name)

    # 4. per-dataset internal mask
    src = tmp_path / "mask.tif"
    write_tif(src, img)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(src, "r+") as ds:
        ds.write_mask(np.where(hole, 0, 255).astype(np.uint8))
    # 5. a per-band mask (VRT <MaskBand> on band 2 only): one masked band makes the pixel nodata
    mask_tif = write_tif(tmp_path / "band2mask.tif", np.where(hole, 0, 255).astype(np.uint8))
    vrt = tmp_path / "perband.vrt"
    vrt.write_text(per_band_mask_vrt(src, mask_tif, h, w, masked_band=2))
    for path in (src, vrt):
        out = tmp_path / f"{path.stem}_{path.suffix[1:]}_out.tif"
        segment(SegmentSettings(input=path, output=out), spec)
        with rasterio.open(out) as ds:
            got = ds.read(1)
        assert (got[hole] == 255).all(), path
        np.testing.assert_array_equal(got[~hole], expected[~hole])


def per_band_mask_vrt(src: Path, mask: Path, h: int, w: int, masked_band: int) -> str:
    bands = []
    for b in (1, 2, 3):
        mask_xml = (
            f"<MaskBand><VRTRasterBand dataType='Byte'><SimpleSource><SourceFilename "
            f"relativeToVRT='0'>{mask}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>"
            f"</VRTRasterBand></MaskBand>"
            if b == masked_band
            else ""
        )
        bands.append(
            f"<VRTRasterBand dataType='Byte' band='{b}'><SimpleSource><SourceFilename "
            f"relativeToVRT='0'>{src}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>"
            f"{mask_xml}</VRTRasterBand>"
        )
    return (
        f"<VRTDataset rasterXSize='{w}' rasterYSize='{h}'><SRS>EPSG:32631</SRS>"
        f"<GeoTransform>500000, 0.5, 0, 5800000, 0, -0.5</GeoTransform>{''.join(bands)}"
        "</VRTDataset>"
    )


def test_all_nodata_tiles_never_reach_the_model(tmp_path):
    class Counting(PerPixelModel):
        pixels = 0

        def forward(self, x):
            Counting.pixels += x.shape[0] * x.shape[2] * x.shape[3]
            return super().forward(x)

    spec = per_pixel_spec(crop=32, stride=32)
    spec.module = Counting(4)
    img = random_scene(128, 128)
    img[:, :, 64:] = 0  # right half is nodata: 8 of 16 tiles
    src = write_tif(tmp_path / "half.tif", img, nodata=0)
    result = segment(SegmentSettings(input=src, output=tmp_path / "o.tif", batch_size=3), spec)
    assert result.tiles == 16 and result.tiles_skipped == 8
    assert Counting.pixels == 8 * 32 * 32
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert (ds.read(1)[:, 64:] == 255).all()


def test_outputs_carry_palette_class_names_confidence(tmp_path):
    spec = per_pixel_spec(num_classes=3)
    src = write_tif(tmp_path / "s.tif", random_scene(80, 80))
    out, conf = tmp_path / "c.tif", tmp_path / "conf.tif"
    segment(SegmentSettings(input=src, output=out, confidence=conf), spec)
    with rasterio.open(out) as ds:
        cmap = ds.colormap(1)
        assert cmap[1][:3] == spec.palette[1]
        assert ds.tags()["class_2"] == "class2"
        assert "0=class0" in ds.descriptions[0]
    with rasterio.open(conf) as ds:
        c = ds.read(1)
        assert c.min() >= 255 // 3 and ds.nodata == 0


def test_cog_output_is_valid_with_overviews(tmp_path):
    spec = per_pixel_spec(crop=256, stride=200)
    src = write_tif(tmp_path / "big.tif", random_scene(1100, 1300))
    out = tmp_path / "cog.tif"
    segment(SegmentSettings(input=src, output=out, cog=True), spec)
    with rasterio.open(out) as ds:
        assert ds.overviews(1), "COG needs overviews"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.colormap(1)[0][:3] == spec.palette[0]
        assert ds.block_shapes[0] == (512, 512)


def test_temp_files_are_removed_when_the_model_fails(tmp_path):
    class Boom(PerPixelModel):
        calls = 0

        def forward(self, x):
            Boom.calls += 1
            if Boom.calls == 3:
                raise KeyboardInterrupt
            return super().forward(x)

    spec = per_pixel_spec(crop=32, stride=32)
    spec.module = Boom(4)
    src = write_tif(tmp_path / "s.tif", random_scene(256, 256))
    out = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):
        segment(SegmentSettings(input=src, output=out, confidence=tmp_path / "conf.tif",
                                batch_size=2), spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


@pytest.mark.parametrize(
    "name,bands,range_", [
        ("landsat7_olinda.tif", "3,2,1", None),
        ("spacenet_rotterdam_ms.tif", "3,2,1", "auto"),
        ("rgbn_town.tif", None, None),
    ],
)
def test_real_rasters(tmp_path, name, bands, range_):
    from crossearth_cli.raster.reader import parse_bands, parse_range

    spec = per_pixel_spec(crop=128, stride=85)
    src = SAMPLE_DATA / name
    out = tmp_path / "out.tif"
    result = segment(SegmentSettings(input=src, output=out, bands=parse_bands(bands),
                                     value_range=parse_range(range_, 3)), spec)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        got = b.read(1)
    assert got.max() < 4 and result.nodata_pixels == 0
    assert len(np.unique(got)) > 1


def test_scaling_is_per_scene_not_per_tile(tmp_path):
    """A float scene whose halves differ in brightness keeps that difference after scaling."""
    from crossearth_cli.raster.reader import SceneReader

    img = np.full((3, 64, 128), 100.0, dtype=np.float32)
    img[:, :, 64:] = 1000.0
    img += np.random.default_rng(0).normal(0, 5, img.shape).astype(np.float32)
    src = write_tif(tmp_path / "f.tif", img)
    with SceneReader(src, value_range="auto") as r:
        left, _ = r.read_window(0, 0, 64, 64)
        right, _ = r.read_window(0, 64, 64, 64)
    assert left.mean() < 30 and right.mean() > 225


@pytest.mark.parametrize("parts", [2, 3])
def test_a_scene_split_in_row_parts_equals_one_run(tmp_path, parts):
    """Each rank's band of rows, stacked, is bit-identical to a single run (seams included)."""
    from crossearth_cli.engine import RowPart

    spec = ModelSpec(module=ContextModel(3), class_names=["a", "b", "c"], crop=48, stride=30)
    src = write_tif(tmp_path / "s.tif", random_scene(203, 77, seed=5))
    whole = tmp_path / "whole.tif"
    segment(SegmentSettings(input=src, output=whole, probabilities=tmp_path / "wp.tif",
                            probabilities_dtype="float32"), spec)
    pieces, probs = [], []
    for i in range(parts):
        out = tmp_path / f"part{i}.tif"
        segment(SegmentSettings(input=src, output=out, probabilities=tmp_path / f"p{i}.tif",
                                probabilities_dtype="float32"), spec, part=RowPart(i, parts))
        with rasterio.open(out) as ds, rasterio.open(src) as s:
            # each part is georeferenced where its rows are
            row0 = sum(p.shape[0] for p in pieces)
            assert ds.transform == s.transform * Affine.translation(0, row0)
            pieces.append(ds.read(1))
        with rasterio.open(tmp_path / f"p{i}.tif") as ds:
            probs.append(ds.read())
    with rasterio.open(whole) as ds:
        np.testing.assert_array_equal(np.concatenate(pieces, axis=0), ds.read(1))
    with rasterio.open(tmp_path / "wp.tif") as ds:
        np.testing.assert_array_equal(np.concatenate(probs, axis=1), ds.read())


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
def test_wide_scenes_run_in_column_stripes_identical_to_one_pass(tmp_path, monkeypatch, blend):
    """Stripes bound the band's width; tiles at stripe edges run in both stripes, so every
    pixel sums the same tiles in the same order: bit-identical to one pass over the width."""
    import crossearth_cli.engine as engine
    from crossearth_cli.engine import RowPart

    spec = ModelSpec(module=ContextModel(3), class_names=["a", "b", "c"], crop=48, stride=30)
    img = random_scene(90, 700, seed=8)
    img[:, 40:60, 100:300] = 0  # some nodata across a stripe boundary
    src = write_tif(tmp_path / "wide.tif", img, nodata=0)

    def run(name, part=None):
        out, probs = tmp_path / f"{name}.tif", tmp_path / f"{name}_p.tif"
        r = segment(SegmentSettings(input=src, output=out, probabilities=probs, blend=blend,
                                    probabilities_dtype="float32", confidence=tmp_path /
                                    f"{name}_c.tif"), spec, part=part)
        with rasterio.open(out) as a, rasterio.open(probs) as b, \
                rasterio.open(tmp_path / f"{name}_c.tif") as c:
            return a.read(), b.read(), c.read(), r

    monkeypatch.setattr(engine, "STRIPE_WIDTH", 100_000)
    one = run("one")
    monkeypatch.setattr(engine, "STRIPE_WIDTH", 16)  # → max(16, 2 × 48) = 96 columns: 8 stripes
    striped = run("striped")
    for a, b in zip(one[:3], striped[:3]):
        np.testing.assert_array_equal(a, b)
    assert striped[3].tiles > one[3].tiles  # edge tiles ran twice
    parts = [run(f"part{i}", RowPart(i, 2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], axis=1), one[0])


def test_the_default_batch_size_is_auto_which_is_four_tiles_on_the_cpu(tmp_path):
    """`auto` is the default (sized from free memory on a GPU); on the CPU it runs 4 tiles per
    forward pass, as the fixed default did."""
    class Batches(PerPixelModel):
        sizes: list[int] = []

        def forward(self, x):
            Batches.sizes.append(x.shape[0])
            return super().forward(x)

    spec = per_pixel_spec(crop=32, stride=32)
    spec.module = Batches(4)
    src = write_tif(tmp_path / "s.tif", random_scene(96, 96))  # 9 tiles
    settings = SegmentSettings(input=src, output=tmp_path / "o.tif", device="cpu")
    assert settings.batch_size == "auto"
    result = segment(settings, spec)
    assert result.batch_size == 4 and Batches.sizes == [4, 4, 1]


@pytest.mark.parametrize("gcp_crs", ["EPSG:4326", None], ids=["with-crs", "without-crs"])
def test_ground_control_points_are_copied(tmp_path, gcp_crs):
    """A raster georeferenced by GCPs gives outputs with the same GCPs; GCPs without a CRS
    (seen in a damaged file by the fuzz test, which crashed the writer) are kept without one,
    with a note."""
    from rasterio.control import GroundControlPoint

    gcps = [GroundControlPoint(0, 0, 10.0, 50.0), GroundControlPoint(0, 64, 10.5, 50.0),
            GroundControlPoint(48, 0, 10.0, 49.6), GroundControlPoint(48, 64, 10.5, 49.6)]
    src = tmp_path / "gcps.tif"
    with rasterio.open(src, "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8",
                       gcps=gcps, crs=CRS.from_user_input(gcp_crs) if gcp_crs else CRS()) as ds:
        ds.write(random_scene(48, 64))
    result = segment(SegmentSettings(input=src, output=tmp_path / "o.tif"),
                     per_pixel_spec(crop=32, stride=24))
    with rasterio.open(tmp_path / "o.tif") as ds:
        points, crs = ds.gcps
    assert [(p.row, p.col, p.x, p.y) for p in points] == [(p.row, p.col, p.x, p.y) for p in gcps]
    assert (crs.to_epsg() if crs else None) == (4326 if gcp_crs else None)
    assert any("ground control points have no CRS" in n for n in result.notes) == (not gcp_crs)


@pytest.mark.parametrize("geotransform", [True, False], ids=["with-geotransform", "rpcs-only"])
def test_rpcs_are_copied_and_no_geotransform_is_made_up(tmp_path, geotransform):
    """A raster with RPCs (a satellite scene before orthorectification) gives outputs with the
    same RPCs. Without a geotransform none is written: an identity one placed the raster at
    0°, 0° in its CRS (EPSG:4326), and its vectors in degrees that were pixels. The vectors
    are then in pixel coordinates without a CRS, and a note says so."""
    from rasterio.rpc import RPC
    from rasterio.transform import from_origin

    from crossearth_cli.vector.api import vectorize_raster

    rpc = RPC(height_off=0, height_scale=500, lat_off=45, lat_scale=0.1, line_off=24,
              line_scale=24, long_off=10, long_scale=0.1, samp_off=32, samp_scale=32,
              line_num_coeff=[0, 0, -1] + [0] * 17, line_den_coeff=[1] + [0] * 19,
              samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19)
    src = tmp_path / "rpc.tif"
    extra = {"transform": from_origin(500000, 5000000, 0.5, 0.5)} if geotransform else {}
    with rasterio.open(src, "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8",
                       crs=CRS.from_epsg(32633 if geotransform else 4326), rpcs=rpc,
                       **extra) as ds:
        ds.write(random_scene(48, 64))
    result = segment(SegmentSettings(input=src, output=tmp_path / "o.tif"),
                     per_pixel_spec(crop=32, stride=24))
    assert not any("no georeferencing" in n for n in result.notes)
    with rasterio.open(src) as want, rasterio.open(tmp_path / "o.tif") as got:
        assert got.rpcs.to_dict() == want.rpcs.to_dict()
        assert got.crs == want.crs and got.transform == want.transform
    gdal_view = subprocess.run(["gdalinfo", str(tmp_path / "o.tif")], capture_output=True,
                               text=True).stdout if shutil.which("gdalinfo") else None
    if gdal_view is not None:  # GDAL's own view: no geotransform made up
        assert ("Origin =" in gdal_view) == geotransform and "RPC Metadata" in gdal_view
    summary = vectorize_raster(tmp_path / "o.tif", tmp_path / "o.gpkg")
    said = any("georeferenced by RPCs only" in w for w in summary.warnings)
    assert said == (not geotransform)
    import pyogrio

    info = pyogrio.read_info(tmp_path / "o.gpkg", layer=pyogrio.list_layers(
        tmp_path / "o.gpkg")[0][0])
    assert (info["crs"] is None) == (not geotransform)
