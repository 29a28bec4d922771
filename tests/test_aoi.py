"""``--aoi``: only an area of interest is segmented; its outputs sit on the input's own grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import shapely
from helpers import PerPixelModel, per_pixel_spec, random_scene, tiny_model, write_tif
from rasterio.features import geometry_mask
from rasterio.transform import Affine
from rasterio.warp import transform as warp_points
from reliability_helpers import assert_nothing_written, assert_user_error, cli, snapshot

from crossearth_cli import engine
from crossearth_cli.engine import ModelSpec, RowPart, SegmentSettings, Session
from crossearth_cli.raster.aoi import AreaOfInterest, OutsideAOI, parse_aoi, place_aoi
from crossearth_cli.raster.reader import SceneReader


def _area(geom, crs=None) -> AreaOfInterest:
    return AreaOfInterest(((crs, geom),), "test area")


def _pixel_polygon(transform: Affine, coords) -> shapely.Polygon:
    """A polygon given in (column, row) pixels, in the raster's CRS."""
    return shapely.Polygon([transform * xy for xy in coords])


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs, ds.nodata


def _run(tmp_path, name, src, spec, aoi=None, part=None, **kw):
    """Outputs (data, transform, crs, nodata) of classes, confidence, probabilities; (None,
    None) for a row part with no rows of the AOI. One tile per forward pass: the CPU kernels
    round differently with the batch's size and make-up, and this compares to the bit."""
    paths = {k: tmp_path / f"{name}_{k}.tif" for k in ("c", "p")}
    settings = SegmentSettings(input=src, output=tmp_path / f"{name}.tif", aoi=aoi,
                               confidence=paths["c"], probabilities=paths["p"], **kw)
    with Session(spec, "cpu", batch_size=1) as session:
        scene = session.prepare(settings, part)
        if scene.rows.y1 <= scene.rows.y0:
            scene.close()
            return None, None
        result = session.run(scene)
    return result, [_read(settings.output), _read(paths["c"]), _read(paths["p"])]


def _tiny_spec(crop=48, stride=32, classes=4):
    return ModelSpec(module=tiny_model(classes), class_names=[f"c{i}" for i in range(classes)],
                     palette=[(i, i, i) for i in range(classes)], crop=crop, stride=stride,
                     label="tiny")


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
@pytest.mark.parametrize("how", ["one pass", "stripes", "row parts"])
def test_inside_the_aoi_every_output_is_the_whole_scene_runs_and_outside_nodata(
        tmp_path, monkeypatch, how, blend):
    """The tiny model looks at its neighbours, so context counts: inside a triangle in the
    middle of the scene, every output is bit for bit the whole scene's, on the same pixels of
    the same grid; outside it, each output's nodata. Six classes, as Potsdam's: summed over
    classes by ``torch.sum``, a pixel's total could differ in its last bit with the window's
    width (float32 probabilities differed by 1.2e-7 in an audit)."""
    spec = _tiny_spec(classes=6)
    src = write_tif(tmp_path / "s.tif", random_scene(260, 700, seed=4))
    with rasterio.open(src) as ds:
        t = ds.transform
    triangle = _pixel_polygon(t, [(150.3, 40.7), (610.2, 60.1), (220.6, 230.4)])
    _, whole = _run(tmp_path, "whole", src, spec, probabilities_dtype="float32", blend=blend)
    if how == "stripes":
        monkeypatch.setattr(engine, "STRIPE_WIDTH", 16)  # max(16, 2 × 48): 96-column stripes
    parts = [RowPart(i, 3) for i in range(3)] if how == "row parts" else [None]
    runs = [_run(tmp_path, f"aoi{i}", src, spec, _area(triangle), part=p, blend=blend,
                 probabilities_dtype="float32") for i, p in enumerate(parts)]
    runs = [(r, o) for r, o in runs if r is not None]
    results = [r for r, _ in runs]
    outs = [np.concatenate([o[k][0] for _, o in runs], axis=1) for k in range(3)]
    col, row, w, h = results[0].window[0], results[0].window[1], results[0].width, \
        sum(r.height for r in results)
    # pixel centres 150.5 .. 609.5 and 41.5 .. 229.5 lie in the triangle's bounds
    assert (col, row, w, h) == (150, 41, 460, 189)
    tops = list(np.cumsum([row] + [r.height for r in results])[:-1])
    assert [r.window for r in results] == [(col, y, w, r.height) for y, r in zip(tops, results)]
    first_transform = runs[0][1][0][1]
    assert first_transform == t * Affine.translation(col, row)
    inside = geometry_mask([triangle], out_shape=(h, w), transform=first_transform,
                           invert=True)
    for (whole_data, _, crs, nodata), out, (_, _, out_crs, out_nodata) in zip(
            whole, outs, runs[0][1]):
        assert out_crs == crs and (out_nodata == nodata or np.isnan(out_nodata))
        window = whole_data[:, row:row + h, col:col + w]
        np.testing.assert_array_equal(out[:, inside], window[:, inside])
        if np.isnan(out_nodata):
            assert np.isnan(out[:, ~inside]).all()
        else:
            assert (out[:, ~inside] == out_nodata).all()
    counts = sum(r.class_pixels for r in results)
    np.testing.assert_array_equal(counts, np.bincount(outs[0][0][inside], minlength=6))
    assert sum(r.nodata_pixels for r in results) == (~inside).sum()


def test_a_small_aoi_runs_the_whole_scenes_tiles_that_cover_it(tmp_path):
    """Its tiles are the whole scene's (read in full, past the AOI), so its classes are the
    whole run's even where the AOI is far smaller than a tile."""
    spec = _tiny_spec(crop=64, stride=40)
    src = write_tif(tmp_path / "s.tif", random_scene(150, 170, seed=5))
    with rasterio.open(src) as ds:
        t = ds.transform
    box = _pixel_polygon(t, [(70, 60), (75, 60), (75, 66), (70, 66)])
    _, whole = _run(tmp_path, "whole", src, spec)
    result, outs = _run(tmp_path, "aoi", src, spec, _area(box))
    assert result.window == (70, 60, 5, 6)
    # the whole grid's tiles over columns 70-75 and rows 60-66: one column (40-104) of two
    # rows (0-64, 40-104)
    assert result.tiles == 2
    np.testing.assert_array_equal(outs[0][0], whole[0][0][:, 60:66, 70:75])
    np.testing.assert_array_equal(outs[2][0], whole[2][0][:, 60:66, 70:75])


class Counting(PerPixelModel):
    tiles = 0

    def forward(self, x):
        Counting.tiles += x.shape[0]
        return super().forward(x)


def test_tiles_and_rows_away_from_the_polygons_are_neither_read_nor_run(tmp_path,
                                                                         monkeypatch):
    spec = per_pixel_spec(crop=32, stride=32)
    spec.module = Counting(4)
    src = write_tif(tmp_path / "s.tif", random_scene(640, 640, seed=6))
    with rasterio.open(src) as ds:
        t = ds.transform
    # two 20-px squares at opposite corners: their bounding box is the whole scene
    squares = shapely.MultiPolygon([
        _pixel_polygon(t, [(5, 5), (25, 5), (25, 25), (5, 25)]),
        _pixel_polygon(t, [(610, 610), (630, 610), (630, 630), (610, 630)]),
    ])
    rows_read = []
    real_read = SceneReader.read_raw

    def read_raw(self, y, x, h, w):
        rows_read.append((y, y + h))
        return real_read(self, y, x, h, w)

    monkeypatch.setattr(SceneReader, "read_raw", read_raw)
    Counting.tiles = 0
    result, outs = _run(tmp_path, "aoi", src, spec, _area(squares))
    assert Counting.tiles == 2 and result.tiles == 400  # one tile per square
    assert result.tiles_skipped == 398
    # rows that only tiles outside the squares use are never read
    assert rows_read and all(b <= 32 or a >= 608 for a, b in rows_read)
    classes = outs[0][0][0]
    assert (classes != 255).sum() == 2 * 20 * 20


def test_a_box_in_degrees_is_the_area_it_encloses_on_a_utm_grid(tmp_path):
    """Each output pixel is kept exactly when its centre, taken to longitude and latitude by
    PROJ directly, falls in the box. 200 km east of the zone's central meridian, meridians
    lean about 2° on the UTM grid, so the box is a tilted shape there, not the window."""
    src = write_tif(tmp_path / "s.tif", random_scene(200, 240, seed=7),
                    transform=Affine(0.5, 0, 700000, 0, -0.5, 5800000))
    with rasterio.open(src) as ds:
        t, crs = ds.transform, ds.crs
    lon, lat = warp_points(crs, "EPSG:4326", [t.c + 20, t.c + 100], [t.f - 90, t.f - 30])
    box = f"{lon[0]},{lat[0]},{lon[1]},{lat[1]}"
    spec = per_pixel_spec()
    result, outs = _run(tmp_path, "aoi", src, spec, parse_aoi(box, "EPSG:4326"))
    col, row, w, h = result.window
    out_t = outs[0][1]
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = out_t * (cols.ravel(), rows.ravel())
    plon, plat = map(np.asarray, warp_points(crs, "EPSG:4326", xs, ys))
    want = ((plon >= lon[0]) & (plon <= lon[1]) & (plat >= lat[0]) & (plat <= lat[1]))
    got = outs[0][0][0].ravel() != 255
    assert 0.8 * w * h < want.sum() < w * h - 100  # the tilt leaves corners out
    np.testing.assert_array_equal(got, want)


def test_an_aoi_polygon_on_a_rotated_grid(tmp_path):
    """A geotransform with rotation: the window and mask follow the file's own pixels."""
    t = Affine(0.4, 0.3, 500000, 0.3, -0.4, 5800000)
    src = write_tif(tmp_path / "s.tif", random_scene(120, 130, seed=8), transform=t)
    poly = _pixel_polygon(t, [(20.2, 30.7), (100.4, 25.1), (90.9, 110.3)])
    spec = per_pixel_spec()
    _, whole = _run(tmp_path, "whole", src, spec)
    result, outs = _run(tmp_path, "aoi", src, spec, _area(poly))
    col, row, w, h = result.window
    assert outs[0][1] == t * Affine.translation(col, row)
    inside = geometry_mask([poly], out_shape=(h, w), transform=outs[0][1], invert=True)
    np.testing.assert_array_equal(outs[0][0][0][inside],
                                  whole[0][0][0, row:row + h, col:col + w][inside])
    assert (outs[0][0][0][~inside] == 255).all()


def test_place_aoi_windows_are_the_pixels_whose_centres_are_in_the_box():
    t = Affine(2.0, 0, 100.0, 0, -2.0, 500.0)
    box = shapely.box(*(t * (3.4, 9.6)), *(t * (7.6, 2.4)))  # columns 3.4-7.6, rows 2.4-9.6
    placed = place_aoi(_area(box), "x.tif", None, t, 50, 40)
    # centres 3.5 .. 7.5 and 2.5 .. 9.5
    assert placed.window == (3, 2, 5, 8) and placed.rectangle
    edge = place_aoi(_area(shapely.box(*(t * (45, 38)), *(t * (60, 30)))), "x.tif", None, t,
                     50, 40)
    assert edge.window == (45, 30, 5, 8)  # cut at the raster's edge


# -- the command line --------------------------------------------------------------------


def test_segment_aoi_from_a_geopackage_and_the_summary(tmp_path, capfd, ckpt):
    src = write_tif(tmp_path / "s.tif", random_scene(120, 160, seed=9))
    with rasterio.open(src) as ds:
        t = ds.transform
    import pyogrio

    poly = _pixel_polygon(t, [(10, 10), (90, 20), (40, 100)])
    pyogrio.raw.write(tmp_path / "area.gpkg", np.array([shapely.to_wkb(poly)], dtype=object),
                      fields=[], field_data=[], geometry_type="Polygon",
                      crs="EPSG:32631", driver="GPKG", layer="area")
    out = tmp_path / "o.tif"
    code, stdout, err = cli(capfd, "segment", src, "-c", ckpt, "-o", out, "--aoi",
                            tmp_path / "area.gpkg", "--summary", tmp_path / "run.json",
                            "--confidence", "auto", "--vector", "auto")
    assert code == 0, err
    assert "--aoi: the outputs cover columns 10 to 89 and rows 10 to 99 of the input (80x90 px, " \
           "37.5% of it)" in " ".join(err.split()), err
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["window"] == {"col_off": 10, "row_off": 10, "width": 80, "height": 90}
    classes, out_t, _, _ = _read(out)
    assert classes.shape == (1, 90, 80) and out_t == t * Affine.translation(10, 10)
    inside = geometry_mask([poly], out_shape=(90, 80), transform=out_t, invert=True)
    assert (classes[0][inside] != 255).all() and (classes[0][~inside] == 255).all()
    assert summary["nodata_pixels"] == (~inside).sum()
    layers = pyogrio.list_layers(tmp_path / "o.gpkg")
    total = shapely.union_all(np.concatenate([
        shapely.from_wkb(pyogrio.raw.read(tmp_path / "o.gpkg", layer=name)[2])
        for name, _ in layers]))
    assert total.buffer(-1).within(poly)  # polygons only inside the AOI


def test_a_geojson_in_metres_without_a_crs_member(tmp_path, capfd, ckpt):
    """GeoJSON without "crs" is read as longitude/latitude (RFC 7946). Coordinates that
    cannot be degrees say so and point to --aoi-crs, which then names their CRS (before, the
    first run said the AOI holds no pixel, and --aoi-crs that the file has its own CRS)."""
    src = write_tif(tmp_path / "s.tif", random_scene(120, 160, seed=9))
    with rasterio.open(src) as ds:
        t = ds.transform
    poly = _pixel_polygon(t, [(10, 10), (90, 20), (40, 100)])
    aoi = tmp_path / "area.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(poly)}]}))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif", "--aoi",
                       aoi)
    assert_user_error(code, err, f"--aoi {aoi}: its coordinates reach 5,799,995, which no "
                      "longitude or latitude does, yet its CRS is EPSG:4326",
                      "give --aoi-crs with the CRS they are in")
    assert_nothing_written(tmp_path, before)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif", "--aoi",
                       aoi, "--aoi-crs", "EPSG:32631", "--summary", tmp_path / "run.json")
    assert code == 0, err
    window = json.loads((tmp_path / "run.json").read_text())["window"]
    assert window == {"col_off": 10, "row_off": 10, "width": 80, "height": 90}


def test_points_lines_and_invalid_polygons_in_an_aoi_file_are_told(tmp_path, capfd, ckpt):
    import pyogrio

    src = write_tif(tmp_path / "s.tif", random_scene(60, 60, seed=3))
    with rasterio.open(src) as ds:
        t = ds.transform
    bowtie = _pixel_polygon(t, [(5, 5), (40, 40), (40, 5), (5, 40)])  # self-intersecting
    line = shapely.LineString([t * (0, 0), t * (50, 50)])
    point = shapely.Point(t * (20, 20))
    pyogrio.raw.write(tmp_path / "mixed.gpkg",
                      np.array(shapely.to_wkb([bowtie, line, point]), dtype=object), fields=[],
                      field_data=[], geometry_type="Unknown", crs="EPSG:32631", driver="GPKG")
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif", "--aoi",
                       tmp_path / "mixed.gpkg")
    assert code == 0, err
    said = " ".join(err.split())
    assert f"note: --aoi {tmp_path / 'mixed.gpkg'}: 2 point or line feature(s) left out (not " \
           "areas)" in said, err
    assert "1 invalid polygon(s) (self-intersecting, or similar) repaired" in said, err


@pytest.mark.parametrize("args, needles", [
    (["--aoi", "1,2,3"], ["--aoi 1,2,3", "not a box"]),
    (["--aoi", "5,5,1,1"], ["W < E"]),
    (["--aoi", "."], ["--aoi .: a folder, not a vector file", "Shapefile (.shp)"]),
    (["--aoi", "0,0,1,1", "--aoi-crs", "EPSG:99999"], ["--aoi-crs", "EPSG:99999"]),
    (["--aoi-crs", "EPSG:4326"], ["add --aoi"]),
    (["--aoi", "0,0,1,1"], ["s.tif", "holds no pixel", "EPSG:32631"]),
])
def test_aoi_mistakes_are_one_line_and_write_nothing(tmp_path, capfd, ckpt, args, needles):
    src = write_tif(tmp_path / "s.tif", random_scene(40, 40))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif", *args)
    assert_user_error(code, err, *needles)
    assert_nothing_written(tmp_path, before)


def test_aoi_files_that_cannot_serve(tmp_path, capfd, ckpt):
    import pyogrio

    src = write_tif(tmp_path / "s.tif", random_scene(40, 40))
    line = shapely.LineString([(500000, 5799990), (500010, 5799980)])
    pyogrio.raw.write(tmp_path / "line.gpkg", np.array([shapely.to_wkb(line)], dtype=object),
                      fields=[], field_data=[], geometry_type="LineString", crs="EPSG:32631",
                      driver="GPKG")
    (tmp_path / "junk.geojson").write_text("{ not json")
    no_crs = write_tif(tmp_path / "nocrs.tif", random_scene(40, 40), crs=None)
    before = snapshot(tmp_path)
    for aoi, target, extra, needles in [
        ("line.gpkg", src, [], ["line.gpkg", "no polygon"]),
        ("junk.geojson", src, [], ["junk.geojson", "vector file"]),
        ("line.gpkg", src, ["--aoi-crs", "EPSG:4326"], ["own CRS", "--aoi-crs"]),
        ("500000,5799980,500010,5799990", no_crs, ["--aoi-crs", "EPSG:32631"],
         ["nocrs.tif", "no CRS"]),
    ]:
        code, _, err = cli(capfd, "segment", target, "-c", ckpt, "-o", tmp_path / "o.tif",
                           "--aoi", tmp_path / aoi if "." in aoi[-8:] else aoi, *extra)
        assert_user_error(code, err, *needles)
    assert_nothing_written(tmp_path, before)


def test_a_folder_run_leaves_out_inputs_outside_the_aoi_and_resumes_by_it(tmp_path, capfd,
                                                                          ckpt):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(3):  # three 40-px tiles side by side, 20 m wide each
        write_tif(folder / f"t{i}.tif", random_scene(40, 40, seed=i),
                  transform=Affine(0.5, 0, 500000 + 20 * i, 0, -0.5, 5800000))
    out = tmp_path / "out"
    first = "500005,5799985,500035,5799995"  # tiles 0 and 1
    code, stdout, err = cli(capfd, "segment", folder, "-c", ckpt, "-o", out, "--aoi", first)
    assert code == 0, err
    assert "1 of 3 input(s) lie outside it" in err
    assert sorted(p.name for p in out.glob("*.tif")) == ["t0_classes.tif", "t1_classes.tif"]
    assert _read(out / "t0_classes.tif")[0].shape == (1, 20, 30)
    code, stdout, _ = cli(capfd, "segment", folder, "-c", ckpt, "-o", out, "--aoi", first)
    assert code == 0 and "files done" in stdout
    assert _batch_row(stdout)[:2] == ["0", "2"]  # nothing to redo
    code, stdout, err = cli(capfd, "segment", folder, "-c", ckpt, "-o", out, "--aoi",
                            "500005,5799985,500025,5799995")  # another area: redone
    assert code == 0, err
    assert _batch_row(stdout)[:2] == ["2", "0"]
    assert _read(out / "t1_classes.tif")[0].shape == (1, 20, 10)
    code, stdout, err = cli(capfd, "segment", folder, "-c", ckpt, "-o", out, "--aoi",
                            "500005,5799985,500015,5799995", "--summary", tmp_path / "s.json")
    assert code == 0, err
    assert "2 of 3 input(s) lie outside it and are left out; 1 of them (t1.tif) have outputs" \
        in " ".join(err.split()), err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["outside_aoi"] == ["t1.tif", "t2.tif"] and summary["done"] == ["t0.tif"]
    assert summary["windows"] == {"t0.tif": {"col_off": 10, "row_off": 10, "width": 20,
                                             "height": 20}}
    code, _, err = cli(capfd, "segment", folder, "-c", ckpt, "-o", out, "--aoi", "0,0,1,1")
    assert_user_error(code, err, "holds no pixel of any of the 3 input(s)")


def test_an_aoi_in_degrees_as_large_as_the_world_holds_the_whole_raster(tmp_path):
    """PROJ cannot take the whole world to a UTM zone: the AOI is cut near the raster first."""
    src = write_tif(tmp_path / "s.tif", random_scene(60, 80, seed=13))
    for box in ("-180,-90,180,90", "-90,0,90,80"):
        placed = place_aoi(parse_aoi(box, "EPSG:4326"), src, *_header(src))
        assert placed.window == (0, 0, 80, 60) and placed.rectangle, box


def _header(path):
    with rasterio.open(path) as ds:
        return ds.crs, ds.transform, ds.width, ds.height


def _batch_row(stdout: str) -> list[str]:
    """The figures row of the folder table (files done, skipped, failed, ...)."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if cells and all(c.replace(".", "").isdigit() for c in cells):
            return cells
    raise AssertionError(stdout)


def test_float_probabilities_outside_the_aoi_are_nan(tmp_path):
    spec = per_pixel_spec()
    src = write_tif(tmp_path / "s.tif", random_scene(80, 80))
    with rasterio.open(src) as ds:
        t = ds.transform
    tri = _pixel_polygon(t, [(5, 5), (70, 5), (5, 70)])
    _, outs = _run(tmp_path, "aoi", src, spec, _area(tri), probabilities_dtype="float16")
    probs = outs[2][0]
    inside = geometry_mask([tri], out_shape=probs.shape[1:], transform=outs[2][1], invert=True)
    assert np.isnan(probs[:, ~inside]).all() and np.isfinite(probs[:, inside]).all()
    np.testing.assert_allclose(probs[:, inside].sum(axis=0), 1, atol=3e-3)


def test_small_scenes_sharing_forward_passes_are_masked_each_by_its_own_aoi(tmp_path):
    """A folder's small files run through the model together (Session.run_group); each one's
    outputs still follow the AOI exactly as when it runs alone."""
    from crossearth_cli.engine import Session

    spec = per_pixel_spec(crop=64, stride=48)
    paths = [write_tif(tmp_path / f"t{i}.tif", random_scene(60, 60, seed=10 + i),
                       transform=Affine(0.5, 0, 500000 + 30 * i, 0, -0.5, 5800000))
             for i in range(2)]
    # one triangle in each file, at the same place: equal windows, so one tile shape
    tri = shapely.MultiPolygon([
        shapely.Polygon([(x + 2.2, 5799997.1), (x + 26.7, 5799991.3), (x + 6.1, 5799974.8)])
        for x in (500000, 500030)])
    aoi = _area(tri)
    alone = [_run(tmp_path, f"alone{i}", p, spec, aoi)[1][0] for i, p in enumerate(paths)]
    with Session(spec, "cpu", batch_size=8) as session:
        scenes = [session.prepare(SegmentSettings(input=p, output=tmp_path / f"g{i}.tif",
                                                  aoi=aoi)) for i, p in enumerate(paths)]
        assert session.group_key(scenes[0]) == session.group_key(scenes[1]) is not None
        results = session.run_group(scenes)
    for i, (want, result) in enumerate(zip(alone, results)):
        got = _read(tmp_path / f"g{i}.tif")
        assert got[1] == want[1]
        np.testing.assert_array_equal(got[0], want[0])
        inside = geometry_mask([tri], out_shape=got[0].shape[1:], transform=got[1], invert=True)
        assert inside.any() and (~inside).any()
        assert (got[0][0][~inside] == 255).all() and (got[0][0][inside] != 255).all()
        col, row = ~Affine(0.5, 0, 500000 + 30 * i, 0, -0.5, 5800000) * (got[1].c, got[1].f)
        assert result.window == (round(col), round(row), *got[0].shape[:0:-1])


def test_the_aoi_benchmark_runs_and_runs_fewer_tiles_for_smaller_areas(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_aoi

    assert bench_aoi.main(["--size", "2800", "--repeats", "1", "--json",
                           str(tmp_path / "aoi.json")]) == 0
    rows = json.loads((tmp_path / "aoi.json").read_text())["rows"]
    whole, box, parcels = (r["tiles_run"] for r in rows)
    assert box < whole and parcels < whole
    assert rows[1]["window"] == [700, 700, 1400, 1400]


def test_torchrun_row_parts_of_an_aoi_merge_into_the_single_run(tmp_path, ckpt):
    """Two ranks split the AOI's rows (the first rank's band starts inside the margin) and
    their merged outputs equal one process's, placement and summary included."""
    from helpers import run_cli
    from test_batch import _torchrun

    src = write_tif(tmp_path / "scene.tif", random_scene(300, 190, seed=12))
    (tmp_path / "tri.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {
            "name": "urn:ogc:def:crs:EPSG::32631"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": {
            "type": "Polygon", "coordinates": [[[500010.3, 5799980.2], [500085.1, 5799960.7],
                                                [500030.6, 5799865.4], [500010.3, 5799980.2]]]}}]}))
    opts = ["-c", ckpt, "--tile", "64", "--stride", "40", "--aoi", tmp_path / "tri.geojson",
            "--confidence", "auto"]
    one = run_cli("segment", src, "-o", tmp_path / "one.tif", *opts, "--summary",
                  tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = _torchrun("segment", src, "-o", tmp_path / "two.tif", *opts, "--summary",
                    tmp_path / "two.json")
    assert two.returncode == 0, two.stderr + two.stdout
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["ranks"] == 2
    for key in ("window", "width", "height", "nodata_pixels", "class_shares"):
        assert a[key] == b[key], key
    for name in ("", "_confidence"):
        one_data, two_data = _read(tmp_path / f"one{name}.tif"), _read(tmp_path / f"two{name}.tif")
        assert one_data[1] == two_data[1] and one_data[2] == two_data[2]
        np.testing.assert_array_equal(one_data[0], two_data[0])
    assert sorted(p.name for p in tmp_path.glob("*.tif")) == sorted(
        ["scene.tif", "one.tif", "two.tif", "one_confidence.tif", "two_confidence.tif"])


def test_an_aoi_in_another_crs_that_misses_the_raster_says_so(tmp_path, capfd, ckpt):
    """A box in degrees far from a UTM raster is "no pixel of it" (with the raster's bounds),
    alone and in a folder, where the raster is left out rather than failed."""
    src = write_tif(tmp_path / "s.tif", random_scene(60, 80, seed=14))
    with pytest.raises(OutsideAOI, match=r"holds no pixel of it: the area spans 10,50,11,51 "
                       r"and the raster 3,52\.35.*\(W,S,E,N in EPSG:4326; the raster's "
                       r"500000,5799970,500040,5800000 in EPSG:32631\)"):
        place_aoi(parse_aoi("10,50,11,51", "EPSG:4326"), src, *_header(src))
    folder = tmp_path / "tiles"
    folder.mkdir()
    near = write_tif(folder / "near.tif", random_scene(40, 40, seed=15))
    write_tif(folder / "far.tif", random_scene(40, 40, seed=16),
              transform=Affine(0.5, 0, 200000, 0, -0.5, 5000000))
    with rasterio.open(near) as ds:
        lon, lat = warp_points(ds.crs, "EPSG:4326", [500002, 500018], [5799982, 5799998])
    code, _, err = cli(capfd, "segment", folder, "-c", ckpt, "-o", tmp_path / "out",
                       f"--aoi={lon[0]},{lat[0]},{lon[1]},{lat[1]}", "--aoi-crs", "EPSG:4326",
                       "--summary", tmp_path / "run.json")
    assert code == 0, err
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["outside_aoi"] == ["far.tif"] and summary["done"] == ["near.tif"]


def test_an_aoi_in_a_zipped_shapefile_by_gdal_virtual_path(tmp_path):
    import zipfile

    import pyogrio

    poly = shapely.box(500002, 5799982, 500018, 5799998)
    pyogrio.raw.write(tmp_path / "a.shp", np.array([shapely.to_wkb(poly)], dtype=object),
                      fields=[], field_data=[], geometry_type="Polygon", crs="EPSG:32631",
                      driver="ESRI Shapefile")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        for part in tmp_path.glob("a.*"):
            if part.suffix != ".zip":
                z.write(part, part.name)
    aoi = parse_aoi(f"/vsizip/{tmp_path}/a.zip/a.shp")  # an absolute path: "/vsizip//tmp/..."
    ((crs, geom),) = aoi.parts
    assert crs == rasterio.crs.CRS.from_epsg(32631) and shapely.equals(geom, poly)
