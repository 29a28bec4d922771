"""Simplification keeps a multi-class coverage free of gaps and overlaps, across window seams."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import shapely
from rasterio.transform import from_origin

from crossearth_cli.vector import VectorizeOptions, vectorize_raster
from crossearth_cli.vector.simplify import simplify_coverage
from crossearth_cli.vector.synthetic import blobs, write_class_raster

NAMES = ["background", "building", "road", "tree"]


def read_polygons(path):
    out = []
    for name, _ in pyogrio.list_layers(path):
        _, _, wkb, _ = pyogrio.raw.read(path, layer=name)
        out.append(shapely.from_wkb(wkb))
    return np.concatenate(out)


@pytest.mark.parametrize("tolerance_m", [0.5, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_simplified_coverage_has_no_gaps_or_overlaps(tmp_path, tolerance_m, connectivity):
    h, w = 150, 170
    arr = blobs(h, w, n_classes=4, sigma=2.0, seed=int(tolerance_m * 10) + connectivity)
    src = write_class_raster(
        tmp_path / "c.tif", arr, transform=from_origin(0, 1000, 0.5, 0.5), names=NAMES
    )
    out = tmp_path / "o.gpkg"
    vectorize_raster(
        src,
        out,
        VectorizeOptions(
            simplify=tolerance_m, window_size=48, connectivity=connectivity, workers=1
        ),
    )
    polys = read_polygons(out)
    assert shapely.is_valid(polys).all()
    raster_area = h * w * 0.25
    total = shapely.area(polys).sum()
    union = shapely.union_all(polys).area
    # No overlaps: the union is as large as the sum. No gaps: together they cover the raster.
    assert union == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert total == pytest.approx(raster_area, rel=1e-9)
    # ... and simplification really happened.
    exact_vertices = 2 * (h + w)  # a lower bound would be silly; compare against exact output
    assert shapely.get_num_coordinates(polys).sum() > exact_vertices
    exact = tmp_path / "exact.gpkg"
    vectorize_raster(src, exact, VectorizeOptions(window_size=48, connectivity=connectivity))
    assert shapely.get_num_coordinates(polys).sum() < shapely.get_num_coordinates(
        read_polygons(exact)
    ).sum()


def test_selected_classes_stay_disjoint_when_simplified(tmp_path):
    """With only some classes selected, neighbours still share simplified edges exactly."""
    arr = blobs(120, 120, n_classes=4, sigma=1.0, seed=3)
    src = write_class_raster(tmp_path / "c.tif", arr, names=NAMES)
    out = tmp_path / "o.gpkg"
    vectorize_raster(
        src, out, VectorizeOptions(classes=["building", "tree"], simplify=1.5, window_size=40)
    )
    polys = read_polygons(out)
    assert shapely.is_valid(polys).all()
    assert shapely.union_all(polys).area == pytest.approx(shapely.area(polys).sum(), rel=1e-9)


def test_window_coverage_boundary_is_fixed():
    """Shared edges are simplified once for both sides; the window's outline never moves."""
    from crossearth_cli.vector.polygonize import shapes_px

    arr = np.zeros((20, 20), dtype=np.uint8)
    for y in range(20):
        arr[y, : 8 + (y % 3)] = 1  # a jagged vertical boundary between class 1 and class 0
    arr[0:3, 0:2] = 2  # a corner patch on the window edge
    polys, vals = shapes_px(arr, None, 4, 0, 0)
    out = simplify_coverage(polys, 2.0)
    assert shapely.is_valid(out).all()
    assert shapely.union_all(out).equals(shapely.box(0, 0, 20, 20))
    assert shapely.area(out).sum() == 400.0
    # the jagged edge lost its teeth ...
    assert shapely.get_num_coordinates(out).sum() < shapely.get_num_coordinates(polys).sum() / 2
    # ... but vertices on the window edge stayed where they were
    edge = shapely.box(0, 0, 20, 20).boundary
    def on_edge(geoms):
        xy = shapely.get_coordinates(geoms)
        return {tuple(p) for p in xy[shapely.distance(shapely.points(xy), edge) == 0]}

    assert on_edge(polys) <= on_edge(out)
