"""`crossearth segment` as a user runs it: a tiny random-weight CrossEarth checkpoint."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import SAMPLE_DATA, assert_clean_user_error, random_scene, run_cli, write_tif


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from crossearth_cli.model.random_init import tiny_config, write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    return write_random_checkpoint(path, tiny_config(num_classes=6), seed=0, fmt="mmengine",
                                   classes=[f"c{i}" for i in range(6)])


def test_segment_real_raster_end_to_end(tmp_path, tiny_ckpt):
    out = tmp_path / "town_classes.tif"
    proc = run_cli("segment", SAMPLE_DATA / "rgbn_town.tif", "-o", out, "--checkpoint",
                   tiny_ckpt, "--bands", "4,1,2", "--confidence", "auto", "--tile", "256",
                   "--stride", "170")
    assert proc.returncode == 0, proc.stderr
    assert "Mpx/s" in proc.stdout and "515x403" in proc.stdout
    conf = tmp_path / "town_confidence.tif"
    with rasterio.open(SAMPLE_DATA / "rgbn_town.tif") as a, rasterio.open(out) as b:
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        assert b.tags()["class_5"] == "c5" and b.colormap(1)
        assert b.read(1).max() < 6
    assert conf.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([conf.name, out.name])


def test_segment_float64_real_raster_with_auto_range(tmp_path, tiny_ckpt):
    out = tmp_path / "rotterdam.tif"
    proc = run_cli("segment", SAMPLE_DATA / "spacenet_rotterdam_ms.tif", "-o", out,
                   "--checkpoint", tiny_ckpt, "--bands", "3,2,1", "--tile", "128", "--stride",
                   "100", "--blend", "mean")
    assert proc.returncode == 0, proc.stderr
    assert "percentiles" in proc.stderr  # the scaling it chose is reported
    with rasterio.open(out) as b:
        assert b.shape == (300, 300) and b.nodata == 255


@pytest.fixture()
def scene(tmp_path) -> Path:
    return write_tif(tmp_path / "scene.tif", random_scene(64, 64))


def _no_outputs(folder: Path, keep: set[str]) -> None:
    left = {p.name for p in folder.iterdir()} - keep
    assert not left, left


def test_missing_input(tmp_path, tiny_ckpt):
    proc = run_cli("segment", tmp_path / "nope.tif", "-c", tiny_ckpt)
    assert_clean_user_error(proc, "nope.tif", "no such file")
    _no_outputs(tmp_path, set())


def test_not_a_raster(tmp_path, tiny_ckpt):
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a raster\n" * 20)
    proc = run_cli("segment", bad, "-c", tiny_ckpt)
    assert_clean_user_error(proc, "notes.tif", "not a readable raster")
    _no_outputs(tmp_path, {"notes.tif"})


def test_truncated_tiff(tmp_path, tiny_ckpt):
    src = write_tif(tmp_path / "full.tif", random_scene(256, 256), tiled=False)
    data = src.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    proc = run_cli("segment", cut, "-c", tiny_ckpt, "-o", tmp_path / "out.tif")
    assert_clean_user_error(proc, "cut.tif")
    assert "truncated" in proc.stderr or "not a readable raster" in proc.stderr
    _no_outputs(tmp_path, {"full.tif", "cut.tif"})


def test_band_out_of_range_and_too_few_bands(tmp_path, scene, tiny_ckpt):
    proc = run_cli("segment", scene, "-c", tiny_ckpt, "--bands", "1,2,5")
    assert_clean_user_error(proc, "scene.tif", "band 5")
    one = write_tif(tmp_path / "gray.tif", random_scene(32, 32, bands=1))
    proc = run_cli("segment", one, "-c", tiny_ckpt)
    assert_clean_user_error(proc, "gray.tif", "1 band", "run it with --bands, e.g. --bands "
                            "1,1,1 to give one band as red, green, blue")
    _no_outputs(tmp_path, {"scene.tif", "gray.tif"})


def test_output_exists_without_overwrite(tmp_path, scene, tiny_ckpt):
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    proc = run_cli("segment", scene, "-c", tiny_ckpt, "-o", out)
    assert_clean_user_error(proc, "out.tif", "--overwrite")
    assert out.read_bytes() == b"precious"
    proc = run_cli("segment", scene, "-c", tiny_ckpt, "-o", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(out) as ds:
        assert ds.shape == (64, 64)


def test_output_folder_cannot_be_written(tmp_path, scene, tiny_ckpt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("segment", scene, "-c", tiny_ckpt, "-o", blocker / "sub" / "out.tif")
    assert_clean_user_error(proc, "output folder")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            proc = run_cli("segment", scene, "-c", tiny_ckpt, "-o", ro / "out.tif")
            assert_clean_user_error(proc, "cannot write")
        finally:
            ro.chmod(stat.S_IRWXU)


def test_output_equal_to_input(tmp_path, scene, tiny_ckpt):
    before = scene.read_bytes()
    proc = run_cli("segment", scene, "-c", tiny_ckpt, "-o", scene, "--overwrite")
    assert_clean_user_error(proc, "input file itself")
    assert scene.read_bytes() == before


def _corrupt_first_block(path):
    """Overwrite the compressed bytes of the file's first block (the last stays readable)."""
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_0_0", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = b"\xff" * size
    path.write_bytes(bytes(data))


def test_a_file_that_fails_mid_run_gets_only_its_error_line(tmp_path, tiny_ckpt):
    """The no-CRS note describes the outputs, so it comes with them: a raster without a CRS
    whose first block is corrupt (the last one, read at open, is fine) fails with one line."""
    from rasterio.transform import Affine

    src = write_tif(tmp_path / "damaged.tif", random_scene(64, 64), crs=None,
                    transform=Affine(2, 0, 0, 0, -2, 0), tiled=False, compress="deflate",
                    blockxsize=64, blockysize=16)  # 4 strips of 16 rows
    _corrupt_first_block(src)
    proc = run_cli("segment", src, "-c", tiny_ckpt, "-o", tmp_path / "out.tif", "--tile", "32")
    assert_clean_user_error(proc, "damaged.tif", "read failed")
    _no_outputs(tmp_path, {"damaged.tif"})


def test_a_corrupt_block_met_while_sampling_the_value_range_is_a_clean_error(tmp_path,
                                                                            tiny_ckpt):
    """float32 pixels are stretched from the scene's percentiles, read before the run: a
    corrupt block there is one error line too (the fuzz test found a traceback)."""
    src = write_tif(tmp_path / "float.tif", random_scene(64, 64).astype(np.float32),
                    tiled=False, compress="lzw", blockxsize=64, blockysize=16)
    _corrupt_first_block(src)
    proc = run_cli("segment", src, "-c", tiny_ckpt, "-o", tmp_path / "out.tif")
    assert_clean_user_error(proc, "float.tif", "value range", "corrupt")
    _no_outputs(tmp_path, {"float.tif"})


def test_raster_without_crs_warns_and_output_has_none(tmp_path, tiny_ckpt):
    from rasterio.transform import Affine

    src = write_tif(tmp_path / "plain.tif", random_scene(40, 48), crs=None,
                    transform=Affine(2, 0, 0, 0, -2, 0))
    out = tmp_path / "plain_out.tif"
    proc = run_cli("segment", src, "-c", tiny_ckpt, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "no CRS" in proc.stderr
    with rasterio.open(out) as ds:
        assert ds.crs is None


def test_unknown_model_offline_says_how_to_pass_a_checkpoint(tmp_path, scene):
    proc = run_cli("segment", scene, "--model", "potsdam-rgb", "-o", tmp_path / "o.tif",
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_clean_user_error(proc, "--checkpoint")
    proc = run_cli("segment", scene, "--model", "no-such-model", "-o", tmp_path / "o.tif")
    assert_clean_user_error(proc, "no-such-model")


def test_random_weight_fallback_says_so(tmp_path, scene):
    out = tmp_path / "demo.tif"
    proc = run_cli("segment", scene, "--model", "potsdam-irrg", "--allow-random-weights",
                   "-o", out, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                   "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stderr
    with rasterio.open(out) as ds:
        assert ds.tags()["class_1"] == "building"
        assert "RANDOM" in ds.tags()["model"]


def test_probabilities_and_cog(tmp_path, tiny_ckpt):
    src = write_tif(tmp_path / "s.tif", random_scene(96, 80))
    out = tmp_path / "s_classes.tif"
    proc = run_cli("segment", src, "-c", tiny_ckpt, "-o", out, "--probabilities", "auto",
                   "--probabilities-dtype", "float16", "--cog", "--tile", "64", "--stride",
                   "48")
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "s_probabilities.tif") as ds:
        p = ds.read()
        assert ds.count == 6 and ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
        np.testing.assert_allclose(p.sum(0), 1.0, atol=5e-3)


def test_segment_vector_min_area_drops_specks(tmp_path, tiny_ckpt):
    """--vector-min-area reaches the GeoPackage that segment writes (as vectorize --min-area)."""
    import pyogrio

    def polygon_areas(gpkg: Path) -> np.ndarray:
        areas = []
        for name, kind in pyogrio.list_layers(gpkg):
            if "Polygon" in str(kind):
                meta, _, _, fields = pyogrio.raw.read(gpkg, layer=name, read_geometry=False)
                areas.append(fields[list(meta["fields"]).index("area_m2")])
        return np.concatenate(areas)

    found = {}
    for min_area in (0, 200):
        out = tmp_path / f"town_{min_area}.tif"
        proc = run_cli("segment", SAMPLE_DATA / "rgbn_town.tif", "-o", out, "--checkpoint",
                       tiny_ckpt, "--bands", "4,1,2", "--tile", "256", "--vector", "auto",
                       "--vector-min-area", min_area)
        assert proc.returncode == 0, proc.stderr
        found[min_area] = polygon_areas(out.with_suffix(".gpkg"))
    assert found[0].min() < 200 <= found[200].min()
    assert len(found[200]) == (found[0] >= 200).sum()
