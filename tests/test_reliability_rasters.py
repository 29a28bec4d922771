"""Whatever raster a user has: a clear answer, and nothing broken on disk (docs/reliability.md)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers import PerPixelModel, per_pixel_spec, random_scene, run_cli, write_tif
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window
from reliability_helpers import (
    assert_nothing_written,
    assert_user_error,
    classic_tiff,
    cli,
    hidden_leftovers,
    real_env,
    snapshot,
    unsort_tiff_tags,
)

from crossearth_cli.engine import SegmentSettings, segment


def read(path: Path) -> tuple[np.ndarray, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            return ds.read(1), {"crs": ds.crs, "transform": ds.transform, "shape": ds.shape}


def segment_ok(capfd, src: Path, out: Path, ckpt: Path, *extra) -> str:
    code, stdout, err = cli(capfd, "segment", src, "-c", ckpt, "-o", out, "--tile", "64", *extra)
    assert code == 0, err
    assert "Traceback" not in err
    assert out.exists() and not hidden_leftovers(out.parent)
    return err


# -- files that are not rasters at all -------------------------------------------------------


def _unreadable(tmp: Path, kind: str) -> Path:
    if kind == "zero-byte":
        (tmp / "empty.tif").write_bytes(b"")
        return tmp / "empty.tif"
    if kind == "text":
        (tmp / "notes.tif").write_text("not a raster\n" * 50)
        return tmp / "notes.tif"
    if kind == "truncated-header":
        full = write_tif(tmp / "full.tif", random_scene(64, 64))
        (tmp / "cut.tif").write_bytes(full.read_bytes()[:100])
        full.unlink()
        return tmp / "cut.tif"
    if kind == "cut-directory-at-the-end":  # tags edited after writing move it there
        full = write_tif(tmp / "full.tif", random_scene(64, 64), tiled=False)
        with rasterio.open(full, "r+") as ds:
            ds.update_tags(source="edited after writing")
        data = full.read_bytes()
        assert int.from_bytes(data[4:8], "little") > len(data) * 0.9
        (tmp / "half_copied.tif").write_bytes(data[: len(data) * 9 // 10])
        full.unlink()
        return tmp / "half_copied.tif"
    if kind == "huge-strip":  # 100 000 × 100 000 × 3 claimed, 300 bytes present
        return classic_tiff(tmp / "huge_strip.tif", 100_000, 100_000)
    if kind == "huge-tiled":  # 2^31-1 on each side: GDAL refuses the tile count
        return classic_tiff(tmp / "huge_tiled.tif", 2**31 - 1, 2**31 - 1, tiled=True)
    if kind == "huge-one-band":
        return classic_tiff(tmp / "huge_1band.tif", 4_000_000, 4_000_000, bands=1)
    if kind == "bigtiff-ifd-out-of-reach":  # found by tests/test_fuzz.py: libtiff's seek fails
        path = write_tif(tmp / "far_ifd.tif", random_scene(32, 32), BIGTIFF="YES")
        data = bytearray(path.read_bytes())
        assert data[:4] == b"II+\x00"
        data[8:16] = (0x0001_0003_0100_0012).to_bytes(8, "little")  # first IFD at ~281 TB
        path.write_bytes(bytes(data))
        return path
    if kind == "vrt-source-gone":
        write_tif(tmp / "src.tif", random_scene(32, 32))
        path = tmp / "mosaic.vrt"
        path.write_text(
            '<VRTDataset rasterXSize="32" rasterYSize="32">'
            + "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
                      f'<SourceFilename relativeToVRT="1">gone.tif</SourceFilename>'
                      f'<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>'
                      for b in (1, 2, 3))
            + "</VRTDataset>"
        )
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,needles", [
    pytest.param("vrt-source-gone", ("mosaic.vrt", "refers to a file that cannot be opened",
                                     "gone.tif"), id="vrt-source-gone"),
    pytest.param("zero-byte", ("empty.tif", "empty file (0 bytes)"), id="zero-byte"),
    pytest.param("text", ("notes.tif", "not a readable raster"), id="text"),
    pytest.param("truncated-header", ("cut.tif",), id="truncated-header"),
    pytest.param("cut-directory-at-the-end", ("half_copied.tif", "is truncated or corrupt: its "
                 "header points to byte", "(copy or download it again)"),
                 id="cut-directory-at-the-end"),
    pytest.param("huge-strip", ("huge_strip.tif", "truncated or corrupt"), id="huge-strip"),
    pytest.param("huge-tiled", ("huge_tiled.tif", "not a readable raster"), id="huge-tiled"),
    pytest.param("huge-one-band", ("huge_1band.tif", "truncated or corrupt"),
                 id="huge-one-band"),
    # libtiff also writes "_tiffSeekProc: Invalid argument." straight to fd 2 for this one
    pytest.param("bigtiff-ifd-out-of-reach", ("far_ifd.tif", "is truncated or corrupt: its "
                                              "header points to byte 281,487,878,389,778"),
                 id="bigtiff-ifd-out-of-reach"),
])
def test_unreadable_inputs_fail_fast_with_one_line(tmp_path, capfd, ckpt, kind, needles):
    src = _unreadable(tmp_path, kind)
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "out.tif",
                       "--bands", "1,1,1")
    line = assert_user_error(code, err, *needles)
    assert line.startswith(f"crossearth: error: {src}: "), line  # named first, once
    assert line.count(src.name) == 1 or kind == "vrt-source-gone", line
    assert time.perf_counter() - t0 < 20, "a header claiming a huge raster must fail fast"
    assert_nothing_written(tmp_path, before)


def test_corrupt_block_in_the_middle_fails_mid_run_and_leaves_nothing(tmp_path, capfd, ckpt):
    """The last block is fine (the up-front check passes); a block in the middle is garbage.
    The run fails while writing: outputs under temporary names must vanish."""
    src = tmp_path / "scene.tif"
    with rasterio.open(src, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8",
                       crs="EPSG:32631", transform=from_origin(500000, 5800000, 1, 1), tiled=True,
                       blockxsize=64, blockysize=64, compress="deflate") as ds:
        ds.write(random_scene(256, 256))
    with rasterio.open(src) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_2", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_1_2", "TIFF", bidx=1))
    data = bytearray(src.read_bytes())
    data[offset:offset + size] = bytes([0x5A]) * size
    src.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "out.tif", "--tile",
                       "64", "--confidence", "auto")
    assert_user_error(code, err, "scene.tif", "corrupt")
    assert_nothing_written(tmp_path, before)


def test_complex_pixels_are_refused(tmp_path, capfd, ckpt):
    src = write_tif(tmp_path / "slc.tif", random_scene(32, 32).astype(np.complex64))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "out.tif")
    assert_user_error(code, err, "slc.tif", "complex", "amplitude")
    assert_nothing_written(tmp_path, before)


def test_gdal_warnings_about_odd_tags_do_not_reach_the_user(tmp_path, ckpt):
    """GDAL prints 'Warning 1: TIFFFetchNormalTag: ...' itself; a run that works stays quiet
    apart from our own notes (real process: GDAL writes to file descriptor 2)."""
    src = write_tif(tmp_path / "odd.tif", random_scene(48, 48), tiled=False)
    unsort_tiff_tags(src)
    proc = run_cli("segment", src, "-c", ckpt, "-o", tmp_path / "out.tif", "--tile", "64",
                   env=real_env())
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    debug = run_cli("--debug", "segment", src, "-c", ckpt, "-o", tmp_path / "out2.tif",
                    "--tile", "64", env=real_env())
    assert debug.returncode == 0 and "Warning 1" in debug.stderr  # --debug keeps them


# -- odd but valid rasters: they work ----------------------------------------------------------


@pytest.mark.parametrize("h,w", [(1, 1), (1, 300), (300, 1), (2, 3)])
def test_tiny_and_thin_rasters(tmp_path, capfd, ckpt, h, w):
    img = random_scene(max(h, 8), max(w, 8))[:, :h, :w]
    src = write_tif(tmp_path / "thin.tif", np.ascontiguousarray(img), tiled=False)
    out = tmp_path / "out.tif"
    segment_ok(capfd, src, out, ckpt)
    classes, geo = read(out)
    assert geo["shape"] == (h, w)
    assert geo["transform"] == from_origin(500000, 5800000, 0.5, 0.5)
    assert (classes < 4).all()  # every pixel classified, none nodata


def test_300_bands(tmp_path, capfd, ckpt):
    rng = np.random.default_rng(0)
    src = write_tif(tmp_path / "hyper.tif", rng.integers(0, 256, (300, 40, 48), dtype=np.uint8))
    err = segment_ok(capfd, src, tmp_path / "a.tif", ckpt)
    assert "bands 1,2,3 are assumed" in err
    segment_ok(capfd, src, tmp_path / "b.tif", ckpt, "--bands", "300,150,1")
    assert read(tmp_path / "b.tif")[1]["shape"] == (40, 48)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "c.tif", "--bands",
                       "1,2,301")
    assert_user_error(code, err, "band 301", "300 band")


def test_float64_with_nan_and_inf(tmp_path, capfd, ckpt):
    img = random_scene(64, 64).astype(np.float64) * 12.5
    img[0, 3, 3] = np.nan
    img[1, 10, 20] = np.inf
    img[2, 30, 40] = -np.inf
    img[:, 50, 50] = np.nan
    src = write_tif(tmp_path / "f64.tif", img)
    err = segment_ok(capfd, src, tmp_path / "out.tif", ckpt)
    assert "percentiles" in err  # scaled once per scene, and the tool says how
    classes, _ = read(tmp_path / "out.tif")
    bad = np.zeros((64, 64), bool)
    bad[3, 3] = bad[10, 20] = bad[30, 40] = bad[50, 50] = True
    assert (classes[bad] == 255).all()
    assert (classes[~bad] < 4).all()


def test_int16_with_negative_values(tmp_path, capfd, ckpt):
    img = random_scene(64, 64).astype(np.int16) * 8 - 1000  # -1000 .. 1040
    assert img.min() < 0
    src = write_tif(tmp_path / "dem.tif", img)
    err = segment_ok(capfd, src, tmp_path / "auto.tif", ckpt)
    assert "band 1: -" in err  # the stretch starts below zero: negatives are data
    auto, _ = read(tmp_path / "auto.tif")
    assert (auto < 4).all()
    # the stretch it reported, given explicitly, gives the same classes: what was reported is
    # what was applied, once for the scene
    ranges = [part.split(": ")[1].split("..") for part in
              err.split("percentiles: ")[1].splitlines()[0].split("; ")]
    assert all(float(lo) < 0 for lo, _ in ranges)
    explicit = ",".join(f"{lo},{hi}" for lo, hi in ranges)
    segment_ok(capfd, src, tmp_path / "explicit.tif", ckpt, f"--range={explicit}")
    np.testing.assert_array_equal(read(tmp_path / "explicit.tif")[0], auto)


def _paletted(path: Path, index: np.ndarray, lut: np.ndarray, transparent: int) -> Path:
    """A paletted raster; entry ``transparent`` is nodata (GeoTIFF: the nodata value, PNG:
    alpha 0 in the palette, which GDAL reports the same way)."""
    cmap = {i: (int(lut[0, i]), int(lut[1, i]), int(lut[2, i]),
                0 if i == transparent else 255) for i in range(256)}
    geo = path.suffix == ".tif"
    extra = dict(crs="EPSG:32631", transform=from_origin(500000, 5800000, 0.5, 0.5),
                 nodata=transparent) if geo else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff" if geo else "PNG", width=index.shape[1],
                           height=index.shape[0], count=1, dtype="uint8",
                           photometric="palette", **extra) as ds:
            ds.write(index, 1)
            ds.write_colormap(1, cmap)
    return path


@pytest.mark.parametrize("ext", ["tif", "png"])
def test_paletted_input_is_expanded_to_its_colours(tmp_path, capfd, ckpt, ext):
    rng = np.random.default_rng(3)
    lut = rng.integers(0, 256, (3, 256), dtype=np.uint8)
    index = (random_scene(80, 72, seed=2)[0] // 37).astype(np.uint8)  # colours 0..6
    index[:5, :7] = 7  # entry 7 is transparent: nodata
    src = _paletted(tmp_path / f"pal.{ext}", index, lut, transparent=7)
    err = segment_ok(capfd, src, tmp_path / "pal_out.tif", ckpt)
    assert "paletted raster" in err
    # the same colours written as RGB + alpha (transparent where entry 7 was) give the same
    # classes, pixel for pixel
    alpha = np.where(index == 7, 0, 255).astype(np.uint8)
    write_tif(tmp_path / "rgb.tif", np.concatenate([lut[:, index], alpha[None]]),
              photometric="RGB", alpha="YES")
    segment_ok(capfd, tmp_path / "rgb.tif", tmp_path / "rgb_out.tif", ckpt)
    pal, _ = read(tmp_path / "pal_out.tif")
    ref, _ = read(tmp_path / "rgb_out.tif")
    assert (pal[:5, :7] == 255).all() and (pal[5:] < 4).all()
    np.testing.assert_array_equal(pal, ref)
    # --bands on a paletted file reads the indices, and says so
    err = segment_ok(capfd, src, tmp_path / "idx_out.tif", ckpt, "--bands", "1,1,1")
    assert "colour-table indices" in err
    # and --bands 1,2,3 (the colours are not bands) says what to do instead
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "x.tif", "--bands",
                       "1,2,3")
    assert_user_error(code, err, "band 2 is out of range: the raster has 1 band(s)",
                      "leave out --bands to use its colour table's red, green, blue")


@pytest.mark.parametrize("driver,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_png_and_jpeg_without_georeferencing(tmp_path, capfd, ckpt, driver, ext):
    src = tmp_path / f"photo.{ext}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(src, "w", driver=driver, width=70, height=50, count=3,
                           dtype="uint8") as ds:
            ds.write(random_scene(50, 70))
    out = tmp_path / "photo_classes.tif"
    err = segment_ok(capfd, src, out, ckpt)
    assert "no georeferencing" in err and "pixel coordinates" in err
    classes, geo = read(out)
    assert geo["crs"] is None and geo["transform"].is_identity
    assert geo["shape"] == (50, 70) and (classes < 4).all()
    # and no geotransform written, as the input has none (GDAL would store the identity: a
    # south-up grid at 0,0 that GIS software draws apart from the input)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", NotGeoreferencedWarning)
        rasterio.open(out).close()
    assert any(issubclass(w.category, NotGeoreferencedWarning) for w in seen)
    # its vectors are in pixels, and say so (they were "taken as metres")
    code, _, err = cli(capfd, "vectorize", out, "-o", tmp_path / "photo.gpkg")
    said = " ".join(err.split())
    assert code == 0 and "has no georeferencing: the vectors are in pixel coordinates" in said
    assert "areas and lengths in pixels" in said and "metres" not in said, said


def test_geographic_crs_and_rotated_transform_through_the_cli(tmp_path, capfd, ckpt):
    for name, crs, transform in [
        ("geo", "EPSG:4326", from_origin(13.4, 52.5, 1e-5, 1e-5)),
        ("rot", "EPSG:32633", Affine(0.4, 0.2, 600000.0, 0.15, -0.45, 5200000.0)),
    ]:
        src = write_tif(tmp_path / f"{name}.tif", random_scene(40, 50), crs=crs,
                        transform=transform)
        segment_ok(capfd, src, tmp_path / f"{name}_out.tif", ckpt)
        with rasterio.open(src) as a, rasterio.open(tmp_path / f"{name}_out.tif") as b:
            assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)


# -- nodata ------------------------------------------------------------------------------------


class Counting(PerPixelModel):
    pixels = 0

    def forward(self, x):
        Counting.pixels += x.shape[0] * x.shape[2] * x.shape[3]
        return super().forward(x)


def test_all_nodata_raster_is_all_255_without_running_the_model(tmp_path, capfd, ckpt):
    src = write_tif(tmp_path / "void.tif", np.zeros((3, 700, 900), np.uint8), nodata=0)
    spec = per_pixel_spec(crop=128, stride=96)
    spec.module = Counting(4)
    Counting.pixels = 0
    out = tmp_path / "void_classes.tif"
    result = segment(SegmentSettings(input=src, output=out, confidence=tmp_path / "c.tif"),
                     spec)
    assert Counting.pixels == 0 and result.tiles_skipped == result.tiles
    classes, _ = read(out)
    assert (classes == 255).all() and classes.shape == (700, 900)
    assert out.stat().st_size < 20_000  # nodata blocks are not even written (sparse)
    code, stdout, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "cli.tif",
                            "--cog")
    assert code == 0, err
    assert "nodata 100.0%" in stdout and "; ," not in stdout
    assert f"{tmp_path / 'cli.tif'}: 900x700 px" in " ".join(stdout.split())  # not the % alone
    with rasterio.open(tmp_path / "cli.tif") as ds:  # a valid COG, all nodata
        assert ds.overviews(1) and (ds.read(1) == 255).all()


def test_sparse_100k_by_100k_scene_finishes_in_seconds(tmp_path, ckpt):
    """30 GB of pixels on paper, a few hundred KB on disk: only the patch is read and run.

    Unwritten blocks of a sparse GeoTIFF are recognised from the TIFF's block table, so their
    rows are never read or decompressed, never reach the model, the row band skips them and the
    output leaves them unwritten too.
    """
    from crossearth_cli import engine
    from crossearth_cli.loading import resolve_model
    from crossearth_cli.raster import reader as reader_mod

    n = 100_000
    src = tmp_path / "mosaic.tif"
    patch = Window(61_000, 33_000, 400, 300)
    profile = dict(driver="GTiff", width=n, height=n, count=3, dtype="uint8", nodata=0,
                   crs="EPSG:32631", transform=from_origin(500000, 5800000, 0.5, 0.5),
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                   sparse_ok=True, bigtiff="YES")
    with rasterio.open(src, "w", **profile) as ds:
        ds.write(random_scene(300, 400, seed=5) | 1, window=patch)  # | 1: no zeros in it
    assert src.stat().st_size < 2_000_000

    read_px = []
    real_read = reader_mod.SceneReader.read_raw

    def counting_read(self, y, x, h, w):
        read_px.append(h * w)
        return real_read(self, y, x, h, w)

    spec = resolve_model(checkpoint=ckpt)
    model_px = []
    real_forward = spec.module.forward
    spec.module.forward = lambda x: model_px.append(x.shape[0] * x.shape[2] * x.shape[3]) or \
        real_forward(x)
    out = tmp_path / "mosaic_classes.tif"
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader_mod.SceneReader, "read_raw", counting_read)
        result = engine.segment(SegmentSettings(input=src, output=out, tile=512, stride=512),
                                spec)
    seconds = time.perf_counter() - t0
    print(f"100k x 100k sparse scene: {seconds:.1f} s, {sum(read_px) / 1e6:.0f} Mpx read, "
          f"{result.tiles - result.tiles_skipped} of {result.tiles} tiles run")
    assert result.tiles == 196 * 196
    assert result.tiles - result.tiles_skipped <= 4  # the patch spans at most 2×2 tiles
    assert sum(model_px) <= 4 * 512 * 512
    assert sum(read_px) <= 2 * 512 * n  # the strips holding the patch, nothing else
    assert seconds < 90, f"took {seconds:.0f} s: nodata skipping is not working"
    assert out.stat().st_size < 5_000_000
    with rasterio.open(out) as ds:
        assert ds.shape == (n, n)
        inside = ds.read(1, window=patch)
        around = ds.read(1, window=Window(patch.col_off - 300, patch.row_off - 200, 200, 100))
        corner = ds.read(1, window=Window(n - 512, n - 512, 512, 512))
    assert (inside < 4).all()
    assert (around == 255).all() and (corner == 255).all()


def test_sparse_blocks_without_a_nodata_value_are_real_zeros(tmp_path):
    """Without a nodata value GDAL reads an unwritten block as zeros, which are data: they
    must be segmented, not skipped."""
    src = tmp_path / "s.tif"
    with rasterio.open(src, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8",
                       crs="EPSG:32631", transform=from_origin(500000, 5800000, 1, 1), tiled=True,
                       blockxsize=64, blockysize=64, sparse_ok=True) as ds:
        ds.write(random_scene(64, 64), window=Window(0, 0, 64, 64))
    spec = per_pixel_spec(crop=64, stride=64)
    spec.module = Counting(4)
    Counting.pixels = 0
    result = segment(SegmentSettings(input=src, output=tmp_path / "o.tif"), spec)
    assert result.tiles_skipped == 0 and Counting.pixels == 256 * 256
    classes, _ = read(tmp_path / "o.tif")
    assert (classes < 4).all()


def test_sparse_skipping_gives_the_same_classes_as_reading_everything(tmp_path):
    """Several data patches in a sparse file (some strips partly empty): identical output to
    the same pixels written densely."""
    h, w = 700, 650
    dense = np.zeros((3, h, w), np.uint8)
    src = tmp_path / "sparse.tif"
    profile = dict(driver="GTiff", width=w, height=h, count=3, dtype="uint8", nodata=0,
                   crs="EPSG:32631", transform=from_origin(500000, 5800000, 1, 1), tiled=True,
                   blockxsize=64, blockysize=64)
    with rasterio.open(src, "w", sparse_ok=True, **profile) as ds:
        for i, (y, x) in enumerate([(0, 0), (200, 300), (330, 40), (640, 576)]):
            patch = random_scene(60, 74, seed=i) | 1
            patch = patch[:, : min(60, h - y), : min(74, w - x)]
            ds.write(patch, window=Window(x, y, patch.shape[2], patch.shape[1]))
            dense[:, y:y + patch.shape[1], x:x + patch.shape[2]] = patch
    write_tif(tmp_path / "dense.tif", dense, nodata=0, transform=from_origin(500000, 5800000, 1, 1))
    spec = per_pixel_spec(crop=96, stride=64)
    got = {}
    for name in ("sparse", "dense"):
        segment(SegmentSettings(input=tmp_path / f"{name}.tif", output=tmp_path / f"{name}_o.tif",
                                probabilities=tmp_path / f"{name}_p.tif", batch_size=3), spec)
        got[name] = read(tmp_path / f"{name}_o.tif")[0]
        with rasterio.open(tmp_path / f"{name}_p.tif") as ds:
            got[name + "_p"] = ds.read()
    np.testing.assert_array_equal(got["sparse"], got["dense"])
    np.testing.assert_array_equal(got["sparse_p"], got["dense_p"])
    assert (got["sparse"] == 255).mean() > 0.9


def test_nan_in_a_model_input_never_reaches_the_model(tmp_path):
    """Pixels with NaN in one band are nodata, and the model sees finite numbers only."""
    seen = []

    class Checking(PerPixelModel):
        def forward(self, x):
            seen.append(bool(torch.isfinite(x).all()))
            return super().forward(x)

    img = random_scene(64, 64).astype(np.float32)
    img[2, ::3, ::5] = np.nan
    src = write_tif(tmp_path / "nan.tif", img)
    spec = per_pixel_spec(crop=32, stride=32)
    spec.module = Checking(4)
    segment(SegmentSettings(input=src, output=tmp_path / "o.tif"), spec)
    assert seen and all(seen)
    classes, _ = read(tmp_path / "o.tif")
    assert (classes[::3, ::5] == 255).all()


def test_an_all_nan_scene_says_it_is_nodata_everywhere(tmp_path, capfd, ckpt):
    """No valid pixel to take percentiles from: the note says so (it claimed a 0..255 range),
    and the class raster is nodata throughout."""
    src = write_tif(tmp_path / "nan.tif", np.full((3, 40, 40), np.nan, dtype=np.float32))
    out = tmp_path / "out.tif"
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", out, "--tile", "64")
    assert code == 0, err
    assert "nodata everywhere" in err and "0..255" not in err
    with rasterio.open(out) as ds:
        assert (ds.read(1) == 255).all()


def test_outputs_record_what_reproduces_them(tmp_path, capfd, ckpt):
    """Bands, the --range limits used (as --range takes them), precision and tiling are in
    the outputs' tags: a rerun given them makes the same probabilities, bit for bit."""
    data = (random_scene(80, 96, bands=4, seed=5).astype(np.uint16) * 37 + 900)
    src = write_tif(tmp_path / "s.tif", data)
    segment_ok(capfd, src, tmp_path / "a.tif", ckpt, "--bands", "4,1,2", "--probabilities",
               "auto", "--probabilities-dtype", "float32")
    with rasterio.open(tmp_path / "a.tif") as ds:
        tags = ds.tags()
    assert tags["bands"] == "4,1,2" and tags["precision"] == "fp32" and tags["tile"] == "64"
    assert len(tags["range"].split(",")) == 6  # the scene's percentiles, low and high per band
    segment_ok(capfd, src, tmp_path / "b.tif", ckpt, "--bands", tags["bands"], "--range",
               tags["range"], "--precision", tags["precision"], "--stride", tags["stride"],
               "--blend", tags["blend"], "--probabilities", "auto", "--probabilities-dtype",
               "float32")
    with rasterio.open(tmp_path / "a_probabilities.tif") as a, \
            rasterio.open(tmp_path / "b_probabilities.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert b.tags()["range"] == tags["range"]


def test_an_rgba_raster_for_an_irrg_model_is_told_it_lacks_near_infrared(tmp_path):
    from crossearth_cli.raster.reader import default_bands

    path = tmp_path / "rgba.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=4, dtype="uint8",
                       crs="EPSG:32631", transform=from_origin(500000, 5800000, 1, 1),
                       photometric="RGB", alpha="YES") as ds:
        ds.write(np.zeros((4, 8, 8), np.uint8))
    with rasterio.open(path) as src:
        bands, said = default_bands(src, "IRRG")
        assert bands == [1, 2, 3]
        assert "the raster's bands are red, green, blue (no near-infrared band)" in said
        assert default_bands(src, "RGB") == ([1, 2, 3], None)


def test_containers_and_gdal_names_that_are_not_read_say_so(tmp_path, capfd, ckpt):
    """A NetCDF of two variables names them and how to extract one (it said "has no pixels
    (512x512, 0 band(s))"); a subdataset name or a local GDAL virtual path is refused as what
    it is, with the fix (both said "no such file")."""
    import zipfile

    from scipy.io import netcdf_file

    nc_path = tmp_path / "two.nc"
    nc = netcdf_file(nc_path, "w")
    nc.createDimension("y", 40)
    nc.createDimension("x", 50)
    refl = nc.createVariable("refl", "i2", ("y", "x"))
    refl[:] = np.arange(2000, dtype="int16").reshape(40, 50)
    qa = nc.createVariable("qa", "i1", ("y", "x"))
    qa[:] = 1
    nc.close()
    out = tmp_path / "o.tif"
    code, _, err = cli(capfd, "segment", nc_path, "-o", out, "-c", ckpt)
    line = assert_user_error(code, err, "two.nc: holds 2 rasters (subdatasets: ",
                             "extract the one to segment first, e.g. gdal_translate 'NETCDF:")
    assert "refl" in line and "qa" in line
    code, _, err = cli(capfd, "segment", f'NETCDF:"{nc_path}":refl', "-o", out, "-c", ckpt)
    assert_user_error(code, err, "is a GDAL subdataset name: not read",
                      f"""gdal_translate 'NETCDF:"{nc_path}":refl' out.tif""")
    zipped = tmp_path / "a.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.write(write_tif(tmp_path / "a.tif", random_scene(40, 40)), "a.tif")
    code, _, err = cli(capfd, "segment", f"/vsizip/{zipped}/a.tif", "-o", out, "-c", ckpt)
    assert_user_error(code, err, "is a GDAL virtual path into an archive or other container",
                      "extract the file first")
    for name in ("/vsidata/x.tif", "S2A_MSIL2A:missing.tif"):  # local names: just missing
        code, _, err = cli(capfd, "segment", name, "-o", out, "-c", ckpt)
        assert_user_error(code, err, "no such file")
    assert not out.exists()
