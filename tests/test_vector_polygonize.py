"""Windowed polygonize with merged seams gives exactly the whole-raster polygons."""

from __future__ import annotations

import warnings

import numpy as np
import pyogrio
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from crossearth_cli.vector import VectorizeOptions, vectorize_raster
from crossearth_cli.vector.synthetic import blobs, write_class_raster

NAMES = ["background", "building", "road", "tree"]
PIXEL = 0.5  # m; pixel area 0.25 m², exact in binary
ORIGIN = (500000.0, 5800000.0)


def whole_raster_polygons(arr: np.ndarray, selected, connectivity: int):
    """The reference: GDAL's polygonizer over the whole array in one call."""
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import shapes

    transform = from_origin(*ORIGIN, PIXEL, PIXEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        found = list(
            shapes(arr, mask=np.isin(arr, selected), connectivity=connectivity, transform=transform)
        )
    geoms = np.array([shapely.geometry.shape(g) for g, _ in found], dtype=object)
    vals = np.array([int(v) for _, v in found], dtype=np.int64)
    if connectivity == 8 and len(geoms):
        bad = ~shapely.is_valid(geoms)
        geoms[bad] = shapely.make_valid(geoms[bad], method="structure", keep_collapsed=False)
    return geoms, vals


def read_all(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    geoms, cls, area = [], [], []
    for name, _ in pyogrio.list_layers(path):
        meta, _, wkb, fields = pyogrio.raw.read(path, layer=name)
        if "area_m2" not in list(meta["fields"]):
            continue
        geoms.append(shapely.from_wkb(wkb))
        cls.append(fields[list(meta["fields"]).index("class_id")])
        area.append(fields[list(meta["fields"]).index("area_m2")])
    return np.concatenate(geoms), np.concatenate(cls).astype(np.int64), np.concatenate(area)


def assert_same_polygons(got, got_cls, ref, ref_cls, vertices: bool = True):
    assert len(got) == len(ref), (len(got), len(ref))
    for c in np.unique(ref_cls):
        a, b = got[got_cls == c], ref[ref_cls == c]
        assert len(a) == len(b)
        # Same set of polygons: sort both by a key, then topological equality one by one.
        ka = np.lexsort(np.column_stack([shapely.area(a), shapely.bounds(a)]).T)
        kb = np.lexsort(np.column_stack([shapely.area(b), shapely.bounds(b)]).T)
        a, b = a[ka], b[kb]
        assert shapely.equals(a, b).all()
        assert shapely.area(shapely.symmetric_difference(a, b)).max() == 0.0
        if vertices:  # vertex for vertex (up to where rings start): none added at seams
            assert shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), 0).all()


def run(tmp_path, arr, window, connectivity=4, classes=None, **kw):
    src = write_class_raster(
        tmp_path / "classes.tif", arr, transform=from_origin(*ORIGIN, PIXEL, PIXEL), names=NAMES
    )
    out = tmp_path / "out.gpkg"
    opts = VectorizeOptions(
        window_size=window, connectivity=connectivity, classes=classes, overwrite=True, workers=1,
        **kw,
    )
    vectorize_raster(src, out, opts)
    return out


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(20, 110),
    w=st.integers(20, 110),
    n_classes=st.integers(2, 4),
    sigma=st.sampled_from([0.0, 0.7, 1.5, 3.0]),
    window=st.sampled_from([16, 17, 23, 32, 40, 64, 128]),
    connectivity=st.sampled_from([4, 8]),
)
def test_windowed_equals_whole_raster(tmp_path, seed, h, w, n_classes, sigma, window, connectivity):
    arr = blobs(h, w, n_classes=n_classes, sigma=sigma, seed=seed)
    selected = list(range(n_classes))
    out = run(tmp_path, arr, window, connectivity)
    got, got_cls, got_area = read_all(out)
    ref, ref_cls = whole_raster_polygons(arr, selected, connectivity)
    # under 8-connectivity the reference is made valid (make_valid), so vertices may differ
    assert_same_polygons(got, got_cls, ref, ref_cls, vertices=connectivity == 4)
    assert shapely.is_valid(got).all()
    # Nothing simplified: total area per class is exactly pixel count × pixel area.
    for c in selected:
        assert got_area[got_cls == c].sum() == np.count_nonzero(arr == c) * PIXEL * PIXEL


@pytest.mark.parametrize("connectivity", [4, 8])
def test_seams_through_long_objects_and_corners(tmp_path, connectivity):
    """Stripes spanning every window, a ring around a seam cross, diagonal chains at corners."""
    arr = np.zeros((96, 96), dtype=np.uint8)
    arr[10:14, :] = 2  # a road through every window of a row
    arr[:, 50:53] = 2  # and one through every row
    arr[20:44, 20:44] = 1
    arr[24:40, 24:40] = 0  # a building ring whose hole straddles the seam cross at (32, 32)
    for k in range(60):  # a diagonal chain: 8-connected only, crossing seams at corners
        arr[30 + k // 2, 60 + k // 2 + (k % 2)] = 3 if k < 56 else 0
    for k in range(0, 30):
        arr[60 + k, 5 + k] = 1  # pure diagonal: one polygon under 8, 30 under 4
    out = run(tmp_path, arr, 16, connectivity, classes=["building", "road", "tree"])
    got, got_cls, _ = read_all(out)
    ref, ref_cls = whole_raster_polygons(arr, [1, 2, 3], connectivity)
    assert_same_polygons(got, got_cls, ref, ref_cls, vertices=connectivity == 4)
    roads = got[got_cls == 2]
    assert len(roads) == 1  # the cross is one polygon, not 36 window pieces


def test_windowed_fill_holes_equals_whole_raster(tmp_path):
    """Hole filling with a halo decides each pixel as the whole raster would."""
    arr = blobs(90, 90, n_classes=3, sigma=1.2, seed=7)
    whole = run(tmp_path, arr, 1024, fill_holes=4.0)  # 16 px holes, one window
    g1, c1, a1 = read_all(whole)
    windowed = run(tmp_path, arr, 20, fill_holes=4.0)
    g2, c2, a2 = read_all(windowed)
    assert_same_polygons(g2, c2, g1, c1)
    # Filling changes something here (otherwise the test proves nothing).
    g0, c0, _ = read_all(run(tmp_path, arr, 1024))
    assert len(g0) > len(g1)


def test_a_hole_beyond_the_halo_is_left_open_whole_not_filled_up_to_a_seam(tmp_path):
    """Past the 256-px halo cap, a hole may be seen whole by one window and cut by the next.
    It must then stay open everywhere, not be filled on one side of the seam. A hole as big
    that lies inside one window is still filled."""
    yy, xx = np.mgrid[0:800, 0:800]
    arr = np.full((800, 800), 1, dtype=np.uint8)  # building all round
    across = (yy - 250) ** 2 + (xx - 200) ** 2 < 150**2  # rows 100-400, over the seam at 384
    arr[across] = 2
    inside = (yy - 560) ** 2 + (xx - 560) ** 2 < 150**2  # within the window [384, 768)²
    arr[inside] = 3
    fill_m2 = 0.25 * (across.sum() + 10)
    geoms, cls, area = read_all(run(tmp_path, arr, 384, fill_holes=fill_m2, classes=[1, 2, 3]))
    assert (cls == 2).sum() == 1 and area[cls == 2][0] == pytest.approx(0.25 * across.sum())
    assert not (cls == 3).any()  # filled by building
    assert area[cls == 1].sum() == pytest.approx(0.25 * (arr.size - across.sum()))


def test_nested_holes_go_to_the_outermost_enclosing_class():
    """A building inside the background with a background courtyard inside it: filling holes
    up to the building's size leaves background everywhere, not a building island where the
    courtyard was."""
    from crossearth_cli.vector.holes import fill_small_holes

    arr = np.zeros((60, 60), dtype=np.uint8)
    arr[20:40, 20:40] = 1  # building
    arr[27:33, 27:33] = 0  # its courtyard
    arr[5:8, 45:48] = 2  # a road speck elsewhere
    for connectivity in (4, 8):
        out = fill_small_holes(arr, [0, 1, 2], 500, connectivity)
        assert (out == 0).all(), np.unique(out, return_counts=True)
    # below the building's size only the courtyard and the speck are holes
    out = fill_small_holes(arr, [0, 1, 2], 300, 4)
    assert (out[20:40, 20:40] == 1).all() and (out[5:8, 45:48] == 0).all()
