"""``segment --mosaic``: the tiles of one mosaic segmented as one scene, seamless across files."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from helpers import random_scene, write_tif
from rasterio.crs import CRS
from rasterio.transform import from_origin
from reliability_helpers import assert_nothing_written, assert_user_error, cli, snapshot

from crossearth_cli.raster.mosaic import TileHeader, place

ORIGIN = from_origin(500000, 5800000, 0.5, 0.5)
OPTS = ["--tile", "48", "--stride", "32", "--batch-size", "1"]


def _cut(folder, data, rows, cols, transform=ORIGIN, skip=(), **kw):
    """Write ``data`` cut at ``rows`` × ``cols`` (edges in pixels) as one file per piece."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i, (r0, r1) in enumerate(zip(rows, rows[1:])):
        for j, (c0, c1) in enumerate(zip(cols, cols[1:])):
            if (i, j) in skip:
                continue
            paths.append(write_tif(folder / f"tile_{i}_{j}.tif", data[:, r0:r1, c0:c1],
                                   transform=transform * transform.translation(c0, r0), **kw))
    return paths


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs, ds.nodata


def _header(col, row, w, h, t=ORIGIN, name="x.tif"):
    from pathlib import Path

    return TileHeader(Path(name), None, t * t.translation(col, row), w, h, 3, "uint8", (), (),
                      None, None)


def test_place_puts_each_file_at_its_offset_on_the_union_grid():
    grid = place([_header(10, 5, 30, 20), _header(-4, 25, 8, 8), _header(40, 0, 6, 3)])
    assert (grid.width, grid.height) == (50, 33)
    assert grid.offsets == ((14, 5), (0, 25), (44, 0))
    assert grid.transform == ORIGIN * ORIGIN.translation(-4, 0)
    assert grid.covered == pytest.approx((30 * 20 + 8 * 8 + 6 * 3) / (50 * 33))


def test_place_follows_south_up_grids():
    t = rasterio.Affine(0.5, 0, 500000, 0, 0.5, 5800000)  # rows run north
    grid = place([_header(0, 10, 4, 4, t), _header(0, 0, 4, 4, t)])
    assert grid.offsets == ((0, 10), (0, 0)) and grid.transform == t


@pytest.mark.parametrize("outputs", [["--confidence", "auto"],
                                     ["--probabilities", "auto", "--probabilities-dtype",
                                      "float32"]])
def test_a_mosaic_of_tiles_equals_the_scene_they_were_cut_from(tmp_path, capfd, ckpt, outputs):
    """The tiny model looks at its neighbours: the files' own runs change classes along
    their edges, the mosaic run is bit for bit the whole scene's, on the same grid."""
    data = random_scene(150, 230, seed=21)
    whole = write_tif(tmp_path / "whole.tif", data)
    _cut(tmp_path / "tiles", data, [0, 70, 150], [0, 100, 181, 230])
    code, _, err = cli(capfd, "segment", whole, "-o", tmp_path / "w_classes.tif", "-c", ckpt,
                       *OPTS, *outputs)
    assert code == 0, err
    code, out, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o",
                         tmp_path / "m_classes.tif", "-c", ckpt, *OPTS, *outputs,
                         "--summary", tmp_path / "m.json")
    assert code == 0, err
    assert "mosaic-of" not in out + err
    extra = "_confidence" if "--confidence" in outputs else "_probabilities"
    for name in ("_classes", extra):
        a, b = _read(tmp_path / f"w{name}.tif"), _read(tmp_path / f"m{name}.tif")
        assert a[1:] == b[1:] or (a[1:3] == b[1:3] and np.isnan(a[3]) and np.isnan(b[3]))
        np.testing.assert_array_equal(a[0], b[0])
    summary = json.loads((tmp_path / "m.json").read_text())
    assert len(summary["inputs"]) == 6 and (summary["width"], summary["height"]) == (230, 150)
    # each file on its own: classes change along the file edges
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "-o", tmp_path / "per", "-c",
                       ckpt, *OPTS, "--vrt", tmp_path / "per.vrt")
    assert code == 0, err
    with rasterio.open(tmp_path / "per.vrt") as ds:
        per_file = ds.read(1)
    assert (per_file != _read(tmp_path / "w_classes.tif")[0][0]).sum() > 1000


def test_gaps_overlaps_and_each_files_own_nodata(tmp_path, capfd, ckpt):
    """A missing tile is nodata; each file's nodata is nodata; where two files overlap, the
    later one's nodata does not hide the earlier one's pixels."""
    data = random_scene(96, 128, seed=5)
    data[:, data[0] == 0] = 1  # 0 is a nodata value below: keep it out of the real data
    _cut(tmp_path / "tiles", data, [0, 48, 96], [0, 64, 128], skip={(1, 1)}, nodata=0)
    # a file over the right half of the top row, shifted 16 px left (overlapping tile_0_0),
    # with a nodata hole where it overlaps
    over = data[:, 0:48, 48:128].copy()
    over[:, :, :16] = 0
    write_tif(tmp_path / "tiles" / "tile_9.tif", over, transform=ORIGIN * ORIGIN.translation(
        48, 0), nodata=0)
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o",
                       tmp_path / "m.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    classes, transform, _, nodata = _read(tmp_path / "m.tif")
    assert classes.shape == (1, 96, 128) and transform == ORIGIN and nodata == 255
    assert (classes[0, 48:, 64:] == 255).all()  # the missing tile
    assert (classes[0, :48] != 255).all() and (classes[0, 48:, :64] != 255).all()

    holed = data.copy()  # a hole inside one file is nodata too
    holed[:, 10:20, 10:20] = 0
    _cut(tmp_path / "holed", holed, [0, 96], [0, 128], nodata=0)
    code, _, err = cli(capfd, "segment", tmp_path / "holed", "--mosaic", "-o",
                       tmp_path / "h.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    assert (_read(tmp_path / "h.tif")[0][0, 10:20, 10:20] == 255).all()


def _mosaic(tmp_path, paths):
    from crossearth_cli.raster.mosaic import read_header, write_input_vrt

    grid = write_input_vrt([read_header(p) for p in paths], tmp_path / "m.vrt",
                           bands_given=False)
    with rasterio.open(tmp_path / "m.vrt") as ds:
        return grid, ds.read(), ds.dataset_mask(), ds.nodatavals


def test_the_mosaic_reads_files_with_a_nodata_value_as_each_file_reads(tmp_path):
    """What the model is given: every file's data at its place, the files' nodata value in
    the gaps and where a file has nodata, so that validity is decided as in each file (a
    real 0 in one band stays a real 0); an overlapping file's nodata never hides the file
    below."""
    data = random_scene(64, 96, seed=6)
    data[data == 0] = 1
    data[1, 40:44, 60:64] = 0  # a real 0 in one band of c: valid
    first = write_tif(tmp_path / "a.tif", data[:, :, :48], nodata=0)
    over = data[:, :32, 32:96].copy()
    over[:, :, :16] = 0  # b's nodata, over a's last 16 columns
    second = write_tif(tmp_path / "b.tif", over, transform=ORIGIN * ORIGIN.translation(32, 0),
                       nodata=0)
    third = write_tif(tmp_path / "c.tif", data[:, 32:, 48:80], nodata=0,
                      transform=ORIGIN * ORIGIN.translation(48, 32))
    grid, got, mask, nodata = _mosaic(tmp_path, [first, second, third])
    assert (grid.width, grid.height) == (96, 64) and grid.transform == ORIGIN
    assert nodata == (0, 0, 0)
    np.testing.assert_array_equal(got[:, :, :80], data[:, :, :80])
    assert (got[:, 32:, 80:] == 0).all()  # the gap
    want = np.full((64, 96), 255, np.uint8)
    want[32:, 80:] = 0
    np.testing.assert_array_equal(mask, want)


def test_the_mosaic_reads_masked_files_through_their_masks(tmp_path):
    """Files without a nodata value: their masks (here one file's mask band) and the gaps
    make the mosaic's mask; masked pixels of a later file leave the earlier file's."""
    data = random_scene(48, 64, seed=7)
    first = write_tif(tmp_path / "a.tif", data[:, :, :40])
    below = data[:, :32, 24:64].copy()
    below[:, :, :16] = 0  # masked below: its values must not reach the mosaic
    second = write_tif(tmp_path / "b.tif", below, transform=ORIGIN * ORIGIN.translation(24, 0))
    with rasterio.open(second, "r+") as ds:
        mask = np.full((32, 40), 255, np.uint8)
        mask[:, :16] = 0  # over a
        mask[:4, 30:34] = 0  # b's own hole
        ds.write_mask(mask)
    grid, got, mask, nodata = _mosaic(tmp_path, [first, second])
    assert nodata == (None, None, None)
    want = np.full((48, 64), 255, np.uint8)
    want[32:, 40:] = 0  # the gap
    want[:4, 54:58] = 0
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(got[:, :, :40], data[:, :, :40])
    np.testing.assert_array_equal(got[:, :32, 58:], data[:, :32, 58:])


def test_16_bit_tiles_get_the_whole_scenes_stretch(tmp_path, capfd, ckpt):
    """--range auto on a mosaic is one stretch for all its files: the whole scene's."""
    data = (random_scene(120, 160, seed=8).astype(np.uint16) * 13 + 400)
    data[:, :, 80:] += 1500  # the right-hand files are brighter: a per-file stretch differs
    whole = write_tif(tmp_path / "whole.tif", data)
    _cut(tmp_path / "tiles", data, [0, 60, 120], [0, 80, 160])
    for args in ([whole, "-o", tmp_path / "w.tif"],
                 [tmp_path / "tiles", "--mosaic", "-o", tmp_path / "m.tif"]):
        code, out, err = cli(capfd, "segment", *args, "-c", ckpt, *OPTS)
        assert code == 0, err
    np.testing.assert_array_equal(_read(tmp_path / "w.tif")[0], _read(tmp_path / "m.tif")[0])


def test_aoi_and_vectors_over_a_mosaic(tmp_path, capfd, ckpt):
    """An AOI across two files and a GeoPackage: as from the whole scene."""
    data = random_scene(100, 160, seed=9)
    whole = write_tif(tmp_path / "whole.tif", data)
    _cut(tmp_path / "tiles", data, [0, 100], [0, 90, 160])
    aoi = "500030,5799970,500060,5799990"  # x 60..120 px, rows 20..60: both files
    for args in ([whole, "-o", tmp_path / "w.tif"],
                 [tmp_path / "tiles", "--mosaic", "-o", tmp_path / "m.tif"]):
        code, _, err = cli(capfd, "segment", *args, "-c", ckpt, *OPTS, "--aoi", aoi,
                           "--vector", "auto")
        assert code == 0, err
    a, b = _read(tmp_path / "w.tif"), _read(tmp_path / "m.tif")
    assert a[1:] == b[1:] and a[0].shape == (1, 40, 60)
    np.testing.assert_array_equal(a[0], b[0])
    layers = pyogrio.list_layers(tmp_path / "w.gpkg")[:, 0]
    assert len(layers) and list(layers) == list(pyogrio.list_layers(tmp_path / "m.gpkg")[:, 0])
    for layer in layers:
        wa, ma = (shapely.from_wkb(pyogrio.raw.read(tmp_path / f"{n}.gpkg", layer=layer)[2])
                  for n in "wm")
        assert len(wa) == len(ma)
        assert shapely.union_all(wa).symmetric_difference(shapely.union_all(ma)).area < 1e-6


def test_a_rerun_into_the_input_folder_does_not_take_its_outputs_as_tiles(tmp_path, capfd, ckpt):
    data = random_scene(64, 96, seed=2)
    tiles = _cut(tmp_path / "tiles", data, [0, 64], [0, 48, 96])
    out = tmp_path / "tiles" / "city_classes.tif"
    for _ in range(2):
        code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o", out, "-c",
                           ckpt, *OPTS, "--confidence", "auto", "--overwrite", "--summary",
                           tmp_path / "s.json")
        assert code == 0, err
        assert json.loads((tmp_path / "s.json").read_text())["inputs"] == [str(p) for p in tiles]
    # under another name too: the earlier outputs (classes, confidence) are not tiles
    code, out, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o",
                         tmp_path / "tiles" / "other.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    assert "left out 2 raster(s) that crossearth wrote" in " ".join((out + err).split())
    # a real tile named as an output is refused, even with --overwrite
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o", tiles[1], "-c",
                       ckpt, *OPTS, "--overwrite")
    assert_user_error(code, err, "tile_0_1.tif", "the -o output of --mosaic is one of its inputs")
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o",
                       tmp_path / "m.tif", "--confidence", tiles[0], "-c", ckpt, *OPTS,
                       "--overwrite")
    assert_user_error(code, err, "tile_0_0.tif", "choose another --confidence path")
    assert_nothing_written(tmp_path, before)


def _bad_tile(tmp_path, case):
    data = random_scene(32, 32, seed=1)
    t = ORIGIN * ORIGIN.translation(32, 0)
    kw = {
        "crs": dict(crs=CRS.from_epsg(32632), transform=t),
        "pixel size": dict(transform=from_origin(500016, 5800000, 1.0, 1.0)),
        "grid": dict(transform=from_origin(500016.2, 5800000, 0.5, 0.5)),
        "bands": dict(transform=t),
        "rotated": dict(transform=t * rasterio.Affine.rotation(10)),
        "georeferencing": dict(crs=None, transform=rasterio.Affine.identity()),
        "nodata": dict(transform=t, nodata=7),
        "south-up": dict(transform=rasterio.Affine(0.5, 0, 500016, 0, 0.5, 5799984)),
    }[case]
    if case == "bands":
        data = data[:2]
    write_tif(tmp_path / "tiles" / "b.tif", data, **kw)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("case, needle", [
    ("crs", "its crs"), ("pixel size", "pixel size"), ("grid", "pixel grid"),
    ("bands", "2 band(s) of uint8"), ("rotated", "rotated grid"),
    ("georeferencing", "no georeferencing"),
    ("nodata", "has nodata 7.0 where tile_0_0.tif has no nodata value"),
    ("south-up", "its grid is flipped against tile_0_0.tif's")])
def test_tiles_that_do_not_share_one_grid_are_refused(tmp_path, capfd, ckpt, case, needle):
    _cut(tmp_path / "tiles", random_scene(64, 32, seed=0), [0, 32, 64], [0, 32])
    _bad_tile(tmp_path, case)  # b.tif: the first file, but the odd one out
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o",
                       tmp_path / "m.tif", "-c", ckpt)
    line = assert_user_error(code, err, needle)
    assert "b.tif" in line
    assert_nothing_written(tmp_path, before)


def test_mosaic_output_must_be_one_raster(tmp_path, capfd, ckpt):
    _cut(tmp_path / "tiles", random_scene(32, 32, seed=0), [0, 32], [0, 32])
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o", tmp_path / "out",
                       "-c", ckpt)
    assert_user_error(code, err, "--mosaic writes one raster", ".tif")
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o", tmp_path / "m.tif",
                       "-c", ckpt, "--vrt", tmp_path / "all.vrt")
    assert_user_error(code, err, "leave out --vrt")
    assert_nothing_written(tmp_path, before)


def test_scattered_files_get_a_note_and_nodata_between(tmp_path, capfd, ckpt):
    data = random_scene(32, 232, seed=3)
    _cut(tmp_path / "tiles", data, [0, 32], [0, 32, 200, 232], skip={(0, 1)})
    code, out, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o",
                         tmp_path / "m.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    assert "inputs cover 28% of their bounding box" in " ".join((out + err).split())
    classes = _read(tmp_path / "m.tif")[0][0]
    assert classes.shape == (32, 232) and (classes[:, 32:200] == 255).all()
    assert (classes[:, :32] != 255).all() and (classes[:, 200:] != 255).all()


def test_a_damaged_tile_is_named(tmp_path, capfd, ckpt):
    paths = _cut(tmp_path / "tiles", random_scene(64, 64, seed=0), [0, 32, 64], [0, 64])
    with open(paths[1], "r+b") as f:
        f.truncate(paths[1].stat().st_size // 2)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "--mosaic", "-o", tmp_path / "m.tif",
                       "-c", ckpt)
    assert_user_error(code, err, "tile_1_0.tif", "truncated")
    assert_nothing_written(tmp_path, before)


def test_torchrun_ranks_split_a_mosaic_into_row_bands(tmp_path, ckpt):
    from helpers import run_cli
    from test_batch import _torchrun

    data = random_scene(200, 120, seed=13)
    _cut(tmp_path / "tiles", data, [0, 90, 200], [0, 50, 120])
    opts = ["--mosaic", "-c", ckpt, "--tile", "64", "--stride", "40", "--batch-size", "1"]
    one = run_cli("segment", tmp_path / "tiles", "-o", tmp_path / "one.tif", *opts)
    assert one.returncode == 0, one.stderr
    two = _torchrun("segment", tmp_path / "tiles", "-o", tmp_path / "two.tif", *opts,
                    "--summary", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr + two.stdout
    a, b = _read(tmp_path / "one.tif"), _read(tmp_path / "two.tif")
    assert a[1:] == b[1:]
    np.testing.assert_array_equal(a[0], b[0])
    summary = json.loads((tmp_path / "two.json").read_text())
    assert summary["ranks"] == 2 and len(summary["inputs"]) == 4


def test_the_benchmark_runs_and_finds_the_seams(tmp_path):
    """bench_mosaic.py: one command, a table and JSON; file by file differs from the uncut
    scene along the file edges, --mosaic does not."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_mosaic

    assert bench_mosaic.main(["--size", "800", "--cut", "2", "--json",
                              str(tmp_path / "m.json")]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert rows["--mosaic"]["differ_pct"] == 0 and rows["uncut scene"]["differ_pct"] == 0
    assert rows["file by file"]["differ_near_edges_pct"] > 0


def test_float_tiles_with_nan_nodata(tmp_path):
    data = random_scene(32, 64, seed=4).astype(np.float32) / 255
    data[:, :4, :4] = np.nan
    first = write_tif(tmp_path / "a.tif", data[:, :, :32], nodata=np.nan)
    second = write_tif(tmp_path / "b.tif", data[:, :16, 32:], nodata=np.nan,
                       transform=ORIGIN * ORIGIN.translation(32, 0))
    _, got, _, nodata = _mosaic(tmp_path, [first, second])
    assert all(np.isnan(v) for v in nodata)
    np.testing.assert_array_equal(got[:, :, :32], data[:, :, :32])  # NaN where NaN
    np.testing.assert_array_equal(got[:, :16, 32:], data[:, :16, 32:])
    assert np.isnan(got[:, 16:, 32:]).all()
