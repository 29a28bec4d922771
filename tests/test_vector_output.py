"""The GeoPackage as a GIS user opens it: CRS, layers, attributes, valid geometries, true areas."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pyogrio
import pyproj
import pytest
import shapely
from rasterio.transform import from_origin

from crossearth_cli.errors import InputError, OutputError
from crossearth_cli.vector import VectorizeOptions, vectorize_raster
from crossearth_cli.vector.synthetic import blobs, write_class_raster

NAMES = ["background", "building", "road", "tree"]
POLY_FIELDS = ["class_id", "class_name", "area_m2", "perimeter_m"]


def read(path, layer):
    meta, _, wkb, fields = pyogrio.raw.read(path, layer=layer)
    cols = dict(zip(list(meta["fields"]), fields, strict=True))
    return meta, shapely.from_wkb(wkb), cols


def scene(h=80, w=90, seed=1):
    return blobs(h, w, n_classes=4, sigma=1.5, seed=seed)


def test_layers_crs_fields_and_validity(tmp_path):
    arr = scene()
    src = write_class_raster(tmp_path / "c.tif", arr, crs="EPSG:32631", names=NAMES)
    out = tmp_path / "o.gpkg"
    summary = vectorize_raster(src, out, VectorizeOptions(window_size=32))
    layers = dict(pyogrio.list_layers(out))
    assert layers == {n: "Polygon" for n in NAMES}
    assert summary.layers == {n: pyogrio.read_info(out, layer=n)["features"] for n in NAMES}
    for k, name in enumerate(NAMES):
        info = pyogrio.read_info(out, layer=name)
        assert pyproj.CRS(info["crs"]) == pyproj.CRS("EPSG:32631")
        assert list(info["fields"]) == POLY_FIELDS
        meta, geoms, cols = read(out, name)
        assert len(geoms) > 0
        assert shapely.is_valid(geoms).all()
        assert set(cols["class_id"]) == {k} and set(cols["class_name"]) == {name}
        # UTM, 0.5 m pixels: exactly pixel count × 0.25 m², and the CRS area agrees
        assert cols["area_m2"].sum() == np.count_nonzero(arr == k) * 0.25
        np.testing.assert_allclose(cols["area_m2"], shapely.area(geoms), rtol=1e-12)
        np.testing.assert_allclose(cols["perimeter_m"], shapely.length(geoms), rtol=1e-12)


def test_single_layer_and_empty_layers(tmp_path):
    arr = np.zeros((40, 40), dtype=np.uint8)
    arr[5:10, 5:12] = 1
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    out = tmp_path / "one.gpkg"
    vectorize_raster(src, out, VectorizeOptions(layer_per_class=False, classes=["building"]))
    assert [n for n, _ in pyogrio.list_layers(out)] == ["polygons"]
    _, geoms, cols = read(out, "polygons")
    assert list(cols["class_name"]) == ["building"] and cols["area_m2"][0] == 35 * 0.25

    # Nothing of the class in the scene: an empty layer with the full schema, not an error.
    out2 = tmp_path / "empty.gpkg"
    s = vectorize_raster(src, out2, VectorizeOptions(classes=["tree", "road"], centerlines=True))
    assert s.polygons == 0 and s.lines == 0
    for name in ("tree", "road"):
        info = pyogrio.read_info(out2, layer=name)
        assert info["features"] == 0 and list(info["fields"]) == POLY_FIELDS
    info = pyogrio.read_info(out2, layer="road_centerlines")
    assert info["features"] == 0 and list(info["fields"]) == ["class_id", "class_name", "length_m"]


def test_foreign_raster_without_names(tmp_path):
    arr = np.zeros((30, 30), dtype=np.int16)
    arr[2:8, 2:8] = 7
    arr[20:25, 3:9] = -3
    src = write_class_raster(tmp_path / "c.tif", arr, names=None, nodata=0)
    out = tmp_path / "o.gpkg"
    vectorize_raster(src, out)
    layers = sorted(n for n, _ in pyogrio.list_layers(out))
    assert len(layers) == 2 and "class_7" in layers
    _, _, cols = read(out, "class_7")
    assert list(cols["class_name"]) == ["class_7"] and list(cols["class_id"]) == [7]


def test_geographic_areas_are_geodesic(tmp_path):
    arr = scene(60, 70, seed=4)
    # 1e-5° pixels at 45° N: about 0.79 m × 1.11 m, far from square in degrees
    src = write_class_raster(
        tmp_path / "c.tif", arr, crs="EPSG:4326", transform=from_origin(7.0, 45.0, 1e-5, 1e-5),
        names=NAMES,
    )
    out = tmp_path / "o.gpkg"
    s = vectorize_raster(src, out, VectorizeOptions(window_size=32))
    assert s.area_mode == "geodesic"
    geod = pyproj.Geod(ellps="WGS84")
    for name in NAMES[1:]:
        info = pyogrio.read_info(out, layer=name)
        assert pyproj.CRS(info["crs"]) == pyproj.CRS("EPSG:4326")
        _, geoms, cols = read(out, name)
        expect = np.array([geod.geometry_area_perimeter(g) for g in geoms])
        np.testing.assert_allclose(cols["area_m2"], np.abs(expect[:, 0]), rtol=1e-6)
        # perimeter: every ring, holes included (as a GIS measures it)
        perim = [geod.geometry_length(g.boundary) for g in geoms]
        np.testing.assert_allclose(cols["perimeter_m"], perim, rtol=1e-9)
        k = NAMES.index(name)
        px_m2 = abs(geod.geometry_area_perimeter(shapely.box(7.0, 44.99999, 7.00001, 45.0))[0])
        assert cols["area_m2"].sum() == pytest.approx(np.count_nonzero(arr == k) * px_m2, rel=1e-4)


def test_us_feet_areas_are_square_metres(tmp_path):
    arr = scene(50, 60, seed=5)
    # New York Long Island (US survey feet), 2 ft pixels
    src = write_class_raster(
        tmp_path / "c.tif", arr, crs="EPSG:2263", transform=from_origin(980000, 200000, 2, 2),
        names=NAMES,
    )
    out = tmp_path / "o.gpkg"
    s = vectorize_raster(src, out)
    assert s.area_mode == "planar"
    ft = 1200 / 3937  # US survey foot in metres
    to_ll = pyproj.Transformer.from_crs("EPSG:2263", "EPSG:4326", always_xy=True)
    geod = pyproj.Geod(ellps="GRS80")
    _, geoms, cols = read(out, "building")
    assert cols["area_m2"].sum() == pytest.approx(np.count_nonzero(arr == 1) * 4 * ft * ft, 1e-12)
    # ... and the ground truth agrees to the projection's scale error (< 0.01 % here)
    ll = shapely.transform(geoms, lambda xy: np.column_stack(to_ll.transform(xy[:, 0], xy[:, 1])))
    true = np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in ll])
    np.testing.assert_allclose(cols["area_m2"], true, rtol=1e-4)
    np.testing.assert_allclose(
        cols["perimeter_m"], [geod.geometry_length(g.boundary) for g in ll], rtol=1e-4
    )


def test_mean_confidence(tmp_path):
    import rasterio

    arr = np.zeros((64, 64), dtype=np.uint8)
    arr[4:20, 4:40] = 1  # crosses the seam at x = 32
    arr[40:50, 40:50] = 1
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    conf = np.full((64, 64), 200, dtype=np.uint8)
    conf[4:20, 4:32] = 100  # left part of the first building
    conf[45, 45] = 255  # nodata inside the second building: skipped
    with rasterio.open(src) as ds:
        profile = ds.profile
    profile.update(nodata=255)
    with rasterio.open(tmp_path / "conf.tif", "w", **profile) as ds:
        ds.write(conf, 1)
        ds.scales = (1 / 250,)
    out = tmp_path / "o.gpkg"
    vectorize_raster(
        src, out, VectorizeOptions(classes=["building"], window_size=32), tmp_path / "conf.tif"
    )
    _, geoms, cols = read(out, "building")
    order = np.argsort(shapely.bounds(geoms)[:, 0])
    got = cols["mean_confidence"][order]
    np.testing.assert_allclose(got, [(28 * 100 + 8 * 200) / 36 / 250, 200 / 250])


def test_confidence_on_another_grid_is_refused(tmp_path):
    arr = np.zeros((32, 32), dtype=np.uint8)
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    other = write_class_raster(tmp_path / "x.tif", np.zeros((16, 16), np.uint8), names=NAMES)
    with pytest.raises(InputError, match="another grid than the class raster: 16x16 px "
                       "against 32x32"):
        vectorize_raster(src, tmp_path / "o.gpkg", confidence_path=other)
    assert not (tmp_path / "o.gpkg").exists()
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(src) as ds:
        t = ds.transform
    shifted = write_class_raster(tmp_path / "s.tif", arr, names=NAMES,
                                 transform=from_origin(t.c + 2 * t.a, t.f, t.a, -t.e))
    with pytest.raises(InputError, match="its corner is at column 2, row 0 of the class raster"):
        vectorize_raster(src, tmp_path / "o.gpkg", confidence_path=shifted)
    coarse = write_class_raster(tmp_path / "k.tif", arr, names=NAMES,
                                transform=from_origin(t.c, t.f, 2 * t.a, -2 * t.e))
    with pytest.raises(InputError, match=f"pixels of {2 * t.a:g}x{-2 * t.e:g} against"):
        vectorize_raster(src, tmp_path / "o.gpkg", confidence_path=coarse)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    arr = scene(40, 40)
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        vectorize_raster(src, out)
    assert out.read_bytes() == b"precious"
    vectorize_raster(src, out, VectorizeOptions(overwrite=True))
    assert len(pyogrio.list_layers(out)) == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_interrupt_leaves_nothing(tmp_path):
    arr = scene(80, 80)
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    out = tmp_path / "o.gpkg"

    def progress(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vectorize_raster(src, out, VectorizeOptions(window_size=16, workers=1), progress=progress)
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="Debian's ogrinfo (gdal-bin) absent")
def test_ogrinfo_reads_it(tmp_path):
    arr = scene()
    src = write_class_raster(tmp_path / "c.tif", arr, crs="EPSG:32631", names=NAMES)
    out = tmp_path / "o.gpkg"
    vectorize_raster(src, out, VectorizeOptions(window_size=32, simplify=1.0))
    info = subprocess.run(
        ["ogrinfo", "-so", "-al", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert sorted(re.findall(r"Layer name: (\w+)", info)) == sorted(NAMES)
    assert 'ID["EPSG",32631]' in info
    for field, kind in [("class_id", "Integer"), ("area_m2", "Real"), ("perimeter_m", "Real")]:
        assert f"{field}: {kind}" in info
    counts = [int(c) for c in re.findall(r"Feature Count: (\d+)", info)]
    assert sum(counts) > 0 and "Warning" not in info
    sql = subprocess.run(
        ["ogrinfo", "-q", str(out), "-sql",
         "SELECT count(*) AS n, sum(ST_IsValid(geom)) AS ok FROM building"],
        capture_output=True, text=True, check=True,
    ).stdout
    n = int(re.search(r"n \(Integer\) = (\d+)", sql).group(1))
    ok = re.search(r"ok \(Integer\) = (\d+)", sql)
    assert n == counts[sorted(NAMES).index("building")] or n > 0
    if ok:  # ST_IsValid needs SpatiaLite in GDAL; Debian's build has it
        assert int(ok.group(1)) == n


def test_worker_processes_give_the_same_file(tmp_path):
    """The process pool is only a speed-up: same features, same order, same attributes."""
    arr = scene(130, 120, seed=9)
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.gpkg"
        opts = VectorizeOptions(
            window_size=48, workers=workers, simplify=0.7, centerlines=True, centerline_halo=32
        )
        s = vectorize_raster(src, out, opts)
        assert s.workers == workers
        outs.append(out)
    for name, _ in pyogrio.list_layers(outs[0]):
        _, a, ca = read(outs[0], name)
        _, b, cb = read(outs[1], name)
        assert shapely.equals_exact(a, b, tolerance=0).all()
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k])


def test_interrupt_with_workers_leaves_nothing(tmp_path):
    arr = scene(200, 200)
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)

    def progress(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vectorize_raster(
            src, tmp_path / "o.gpkg", VectorizeOptions(window_size=32, workers=2),
            progress=progress,
        )
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_every_option_together_gives_valid_geometries(tmp_path, connectivity):
    """Regression: 8-connected specks fell back from regularization with rounded vertices."""
    arr = blobs(120, 130, n_classes=4, sigma=1.2, seed=3)
    src = write_class_raster(
        tmp_path / "geo.tif", arr, crs="EPSG:4326", transform=from_origin(10, 50, 1e-5, 1e-5),
        names=NAMES,
    )
    out = tmp_path / "o.gpkg"
    opts = VectorizeOptions(
        connectivity=connectivity, regularize=True, centerlines=True, simplify=0.5,
        fill_holes=2.0, min_area=1.0, window_size=48, centerline_halo=48,
    )
    s = vectorize_raster(src, out, opts)
    assert s.polygons > 0 and s.lines > 0
    for name, gtype in pyogrio.list_layers(out):
        _, geoms, cols = read(out, name)
        assert shapely.is_valid(geoms).all(), name
        if "area_m2" in cols:
            assert gtype == ("Polygon" if connectivity == 4 else "MultiPolygon")
            assert (cols["area_m2"] >= 1.0).all()


def test_tiny_and_empty_rasters(tmp_path):
    tiny = write_class_raster(
        tmp_path / "t.tif", np.array([[1, 0, 1], [0, 1, 0]], np.uint8), names=NAMES
    )
    opts = VectorizeOptions(classes=["building"], centerlines=True)  # no road: building lines
    s = vectorize_raster(tiny, tmp_path / "t.gpkg", opts)
    assert s.layers["building"] == 3 and s.layers["building_centerlines"] == 0
    nodata = write_class_raster(tmp_path / "n.tif", np.full((40, 40), 255, np.uint8), names=NAMES)
    s = vectorize_raster(nodata, tmp_path / "n.gpkg")
    assert s.layers == {n: 0 for n in NAMES}


def test_layer_names_keep_letters_and_drop_accents():
    from crossearth_cli.vector.api import layer_name

    assert layer_name("Épicerie fine") == "epicerie_fine"  # was "picerie_fine"
    assert layer_name("Low vegetation") == "low_vegetation"
    assert layer_name("建筑 区") == "建筑_区"  # was "class"
    assert layer_name("9 lives") == "class_9_lives" and layer_name("  ") == "class"
