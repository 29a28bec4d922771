"""A scene's pixels far from the size the model was trained on are told (once per folder)."""

from __future__ import annotations

import pytest
from helpers import random_scene, write_tif
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from reliability_helpers import cli, tiny_checkpoint

from crossearth_cli.raster.resolution import pixel_size_m, resolution_note

UTM = CRS.from_epsg(32632).to_wkt()


def test_pixel_size_in_metres_whatever_the_crs():
    # on the ellipsoid: UTM's central meridian has a scale of 0.9996
    assert pixel_size_m(UTM, from_origin(500000, 5800000, 0.5, 0.5), 100, 100) == \
        pytest.approx(0.5 / 0.9996, rel=1e-4)
    mercator = CRS.from_epsg(3857).to_wkt()  # at 60° N a Mercator metre is half a metre
    got = pixel_size_m(mercator, from_origin(1e6, 8399737.89, 1.0, 1.0), 100, 100)
    assert got == pytest.approx(0.5, rel=2e-3)
    feet = CRS.from_epsg(2263).to_wkt()  # New York, US survey feet
    assert pixel_size_m(feet, from_origin(980000, 200000, 1.0, 1.0), 100, 100) == \
        pytest.approx(0.3048006, rel=1e-3)
    # a degree of longitude at the equator is ~111.3 km, of latitude ~110.6 km
    wgs84 = CRS.from_epsg(4326).to_wkt()
    got = pixel_size_m(wgs84, from_origin(10.0, 0.0005, 1e-5, 1e-5), 100, 100)
    assert got == pytest.approx((1.1132 * 1.1057) ** 0.5, rel=1e-3)
    assert pixel_size_m(None, from_origin(0, 0, 1, 1), 10, 10) is None
    assert pixel_size_m(UTM, Affine.identity(), 10, 10) is None


@pytest.mark.parametrize(("pixel", "told"), [
    (0.05, None), (0.026, None), (0.1, None),  # within 2x of 0.05 m: nothing to say
    (0.01, "5× finer than the 0.05 m imagery m was trained on"),
    (0.3, "6× coarser than the 0.05 m imagery m was trained on"),
    (5.0, "100× coarser than the 0.05 m imagery m was trained on: far coarser"),
])
def test_told_only_beyond_the_training_range(pixel, told):
    note = resolution_note(pixel, 0.05, "m")
    assert (note is None) if told is None else (told in note), note
    if told and "finer" in told:
        assert "resample to about 0.05 m first" in note
        assert "gdalwarp -tr 0.05 0.05 -r bilinear" in note
    assert resolution_note(pixel, None, "m") is None  # a model of unknown training imagery


def _scene(path, pixel_m):
    return write_tif(path, random_scene(40, 40), transform=from_origin(500000, 5800000,
                                                                       pixel_m, pixel_m))


def test_segment_tells_a_scene_finer_than_the_training_imagery(tmp_path, capfd):
    """A checkpoint named like a released WHU-Building file (0.3 m training imagery)."""
    ckpt = tiny_checkpoint(tmp_path / "WHU-Building-A2S.pth", num_classes=2)
    fine, near = _scene(tmp_path / "fine.tif", 0.05), _scene(tmp_path / "near.tif", 0.4)
    code, _, err = cli(capfd, "segment", fine, "-o", tmp_path / "f.tif", "-c", ckpt)
    assert code == 0, err
    said = " ".join(err.split())
    assert ("pixels are 0.05 m, 6× finer than the 0.3 m imagery whu-building-a2s was "
            "trained on") in said, err
    code, _, err = cli(capfd, "segment", near, "-o", tmp_path / "n.tif", "-c", ckpt)
    assert code == 0 and "pixels are" not in err, err
    # a checkpoint of no known release says nothing of resolutions
    other = tiny_checkpoint(tmp_path / "mine.pth", num_classes=2)
    code, _, err = cli(capfd, "segment", fine, "-o", tmp_path / "o.tif", "-c", other)
    assert code == 0 and "pixels are" not in err, err


def test_a_folder_tells_it_once(tmp_path, capfd):
    ckpt = tiny_checkpoint(tmp_path / "WHU-Building-A2S.pth", num_classes=2)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        _scene(tiles / f"t{i}.tif", 0.05)
    code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "o", "-c", ckpt)
    assert code == 0, err
    said = " ".join(err.split())
    assert said.count("6× finer than the 0.3 m imagery") == 2, err  # once, then "likewise"
    assert "t0.tif: pixels are 0.05 m" in said and "likewise for 2 more file(s)" in said, err
