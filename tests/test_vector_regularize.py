"""Noisy building masks come out as right-angled outlines close to the clean shapes."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import shapely
from rasterio.transform import from_origin

from crossearth_cli.vector import VectorizeOptions, vectorize_raster
from crossearth_cli.vector.regularize import corner_angles, iou, regularize_polygon
from crossearth_cli.vector.synthetic import (
    burn,
    l_shape,
    noisy_edges,
    rotated_rect,
    write_class_raster,
)

H = W = 400
PIXEL = 0.5


def clean_buildings(seed: int):
    rng = np.random.default_rng(seed)
    shapes = []
    for gy in range(5):
        for gx in range(5):
            # the grid is offset so several buildings straddle the 128-px window seams
            cx, cy = 40 + gx * 80, 40 + gy * 80
            angle = float(rng.uniform(-45, 45))
            if (gx + gy) % 3 == 0:
                shapes.append(
                    l_shape(cx, cy, float(rng.uniform(38, 55)), float(rng.uniform(15, 22)), angle)
                )
            else:
                w, h = float(rng.uniform(22, 55)), float(rng.uniform(18, 40))
                shapes.append(rotated_rect(cx, cy, w, h, angle))
    return shapes


def to_pixels(geoms):
    return shapely.transform(
        geoms, lambda xy: np.column_stack([xy[:, 0] / PIXEL, (H * PIXEL - xy[:, 1]) / PIXEL])
    )


def vectorize(tmp_path, mask, **kw):
    src = write_class_raster(
        tmp_path / "b.tif",
        mask.astype(np.uint8),
        transform=from_origin(0, H * PIXEL, PIXEL, PIXEL),
        names=["background", "building"],
    )
    out = tmp_path / "b.gpkg"
    opts = VectorizeOptions(classes=["building"], window_size=128, overwrite=True, **kw)
    vectorize_raster(src, out, opts)
    _, _, wkb, fields = pyogrio.raw.read(out, layer="building")
    return to_pixels(shapely.from_wkb(wkb)), fields


@pytest.mark.parametrize("seed", [1, 2])
def test_noisy_buildings_become_right_angled(tmp_path, seed):
    shapes = clean_buildings(seed)
    mask = noisy_edges(burn((H, W), shapes), amplitude=1.0, seed=seed)
    raw, _ = vectorize(tmp_path, mask, min_area=5.0)
    reg, fields = vectorize(tmp_path, mask, min_area=5.0, regularize=True)
    assert len(reg) == len(raw)
    ious, raw_ious = [], []
    for clean in shapes:
        k = int(np.argmax(shapely.area(shapely.intersection(reg, clean))))
        got = reg[k]
        ious.append(iou(got, clean))
        raw_ious.append(max(iou(r, clean) for r in raw))
        angles = corner_angles(got)
        assert np.abs(angles - 90.0).max() <= 5.0, angles
        n_corners = len(clean.exterior.coords) - 1
        assert len(got.exterior.coords) - 1 <= n_corners + 2  # no staircase left
    assert min(ious) >= 0.9, np.round(ious, 3)
    assert np.mean(ious) > np.mean(raw_ious)  # better than the raw outline, not just as good
    # area stays close to what was segmented
    for g in reg[shapely.area(reg) > 200]:
        r = raw[int(np.argmax(shapely.area(shapely.intersection(raw, g))))]
        assert g.area == pytest.approx(r.area, rel=0.05)


def test_only_building_classes_are_regularized(tmp_path):
    """--regularize picks classes named like buildings; others keep their pixel outlines."""
    mask = np.zeros((H, W), dtype=np.uint8)
    shapes = clean_buildings(3)[:6]
    burnt = noisy_edges(burn((H, W), shapes), amplitude=1.0, seed=3)
    mask[burnt] = 1
    mask[300:340, 20:380] = 2  # a road strip
    mask[350:360, 50:57] = 2
    src = write_class_raster(
        tmp_path / "c.tif", mask, transform=from_origin(0, H * PIXEL, PIXEL, PIXEL),
        names=["background", "building", "road"],
    )
    out = tmp_path / "o.gpkg"
    vectorize_raster(src, out, VectorizeOptions(classes=["building", "road"], regularize=True))
    _, _, wkb, _ = pyogrio.raw.read(out, layer="road")
    roads = shapely.from_wkb(wkb)
    # road outlines are exact pixel edges (axis-aligned, integer pixel corners)
    px = shapely.get_coordinates(to_pixels(roads))
    np.testing.assert_array_equal(px, np.round(px))


def test_multipolygon_and_degenerate_inputs():
    a = rotated_rect(10, 10, 12, 8, 20)
    b = rotated_rect(40, 10, 12, 8, 20)
    out = regularize_polygon(shapely.MultiPolygon([a, b]))
    assert out.geom_type == "MultiPolygon" and out.is_valid
    assert iou(out, shapely.MultiPolygon([a, b])) > 0.95
    tiny = shapely.box(0, 0, 1, 1)
    assert regularize_polygon(tiny).equals(tiny)
    assert regularize_polygon(shapely.Polygon()).is_empty
