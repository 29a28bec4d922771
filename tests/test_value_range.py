"""How non-8-bit values are mapped to the model's 0–255 (``--range``): the scene's sample
finds data in narrow areas, and a given range that does not fit the scene is told."""

from __future__ import annotations

import numpy as np
import rasterio
from helpers import write_tif
from rasterio.windows import Window
from reliability_helpers import cli

from crossearth_cli.raster.reader import scene_percentiles


def _strip_scene(path, size=2048, x0=130, width=40):
    """uint16, nodata 0, no overviews; data only in a north-south strip (a clipped corridor)."""
    rng = np.random.default_rng(2)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", nodata=0,
                   tiled=True, blockxsize=256, blockysize=256, SPARSE_OK=True,
                   crs="EPSG:32631", transform=rasterio.transform.from_origin(5e5, 58e5, 2, 2))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rng.integers(800, 3000, (3, size, width)).astype("uint16"),
                  window=Window(x0, 0, width, size))
    return path


def test_a_narrow_strip_of_data_is_found_by_the_range_sampler(tmp_path, capfd, ckpt):
    """The sparse grid of sample windows missed a 40-px strip on a 2048² scene: the scene
    "looked like nodata everywhere", 0..255 was assumed and every valid pixel reached the
    model white. The whole scene, decimated, is sampled when the grid finds (almost) nothing."""
    src = _strip_scene(tmp_path / "strip.tif")
    with rasterio.open(src) as ds:
        scaling = scene_percentiles(ds, [1, 2, 3])
    for s in scaling:
        assert s.sampled and 800 <= s.low < s.high < 3000, scaling
    code, _, err = cli(capfd, "segment", src, "-o", tmp_path / "o.tif", "-c", ckpt)
    assert code == 0, err
    assert "nodata everywhere" not in err and "percentiles: band 1: 8" in err, err


def test_a_given_range_in_the_wrong_units_is_told(tmp_path, capfd, ckpt):
    """A band stored scaled (reflectance as uint16 × 1e-4 - 0.1): --range is in stored values,
    so 0,0.3 (what a GIS shows) clips every pixel to white; both are told."""
    rng = np.random.default_rng(0)
    data = rng.integers(1000, 4000, (3, 96, 96)).astype("uint16")
    src = write_tif(tmp_path / "refl.tif", data)
    with rasterio.open(src, "r+") as ds:
        ds.scales, ds.offsets = (1e-4,) * 3, (-0.1,) * 3
    code, _, err = cli(capfd, "segment", src, "-o", tmp_path / "o.tif", "-c", ckpt,
                       "--range", "0,0.3")
    said = " ".join(err.split())
    assert code == 0, err
    assert "--range is in the values the file stores; band 1 stores them scaled (shown in " \
           "GIS software as stored × 0.0001 + -0.1)" in said, said
    assert "--range: 95% or more of band 1's sampled values are at or beyond its maximum " \
           "(0.3): they reach the model all white" in said, said
    code, _, err = cli(capfd, "segment", src, "-o", tmp_path / "o.tif", "-c", ckpt,
                       "--range", "1000,4000", "--overwrite")
    assert code == 0 and "--range:" not in err, err  # stored values: fits, nothing to tell
