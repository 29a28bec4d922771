"""Synthetic class rasters with known answers, for tests and the benchmark.

Kept in the package (like ``sklearn.datasets``) so the benchmark and the test-suite draw the
same scenes; nothing here is used by the vectorizer itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def blobs(h: int, w: int, n_classes: int = 3, sigma: float = 2.0, seed: int = 0) -> np.ndarray:
    """Smooth random regions of ``n_classes`` classes (0 is background), uint8."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w), dtype=np.uint8)
    for k in range(1, n_classes):
        field = rng.random((h, w))
        if sigma > 0:
            field = ndi.gaussian_filter(field, sigma)
        thr = np.quantile(field, 1.0 - 0.6 / n_classes)
        out[field > thr] = k
    return out


def write_class_raster(
    path: str | Path,
    data: np.ndarray,
    crs: str | None = "EPSG:32631",
    transform=None,
    names: Sequence[str] | None = None,
    nodata: int | None = 255,
    block: int = 256,
) -> Path:
    """Write a class raster the way ``crossearth segment`` does: tiled, names in the tags."""
    import rasterio
    from rasterio.transform import from_origin

    h, w = data.shape
    profile = dict(
        driver="GTiff",
        width=w,
        height=h,
        count=1,
        dtype=data.dtype,
        crs=crs,
        transform=transform if transform is not None else from_origin(500000, 5800000, 0.5, 0.5),
        nodata=nodata,
        compress="deflate",
    )
    if h >= 16 and w >= 16:
        b = max(16, min(block, 16 * (min(h, w) // 16)))
        profile.update(tiled=True, blockxsize=b, blockysize=b)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data, 1)
        if names is not None:
            ds.update_tags(
                classes=json.dumps(list(names)), **{f"class_{i}": n for i, n in enumerate(names)}
            )
    return Path(path)


# --------------------------------------------------------------------------- buildings


def rotated_rect(cx, cy, w, h, angle_deg):
    import shapely
    from shapely import affinity

    return affinity.rotate(
        shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle_deg, origin=(cx, cy)
    )


def l_shape(cx, cy, size, arm, angle_deg):
    import shapely
    from shapely import affinity

    s, a = size / 2.0, arm
    poly = shapely.Polygon(
        [(-s, -s), (s, -s), (s, -s + a), (-s + a, -s + a), (-s + a, s), (-s, s)]
    )
    return affinity.rotate(affinity.translate(poly, cx, cy), angle_deg, origin=(cx, cy))


def building_grid(seed: int) -> list:
    """25 buildings on an 80-px grid in a 400² frame: rotated rectangles and L shapes at random
    angles; the grid is offset so several straddle 128-px window seams."""
    rng = np.random.default_rng(seed)
    shapes = []
    for gy in range(5):
        for gx in range(5):
            cx, cy = 40 + gx * 80, 40 + gy * 80
            angle = float(rng.uniform(-45, 45))
            if (gx + gy) % 3 == 0:
                size, arm = float(rng.uniform(38, 55)), float(rng.uniform(15, 22))
                shapes.append(l_shape(cx, cy, size, arm, angle))
            else:
                w, h = float(rng.uniform(22, 55)), float(rng.uniform(18, 40))
                shapes.append(rotated_rect(cx, cy, w, h, angle))
    return shapes


def burn(shape_hw, geoms, values=None) -> np.ndarray:
    """Rasterize polygons given in pixel coordinates (pixel centres decide)."""
    from rasterio.features import rasterize

    values = values if values is not None else [1] * len(geoms)
    return rasterize(
        list(zip(geoms, values, strict=True)), out_shape=shape_hw, fill=0, dtype="uint8"
    )


def noisy_edges(mask: np.ndarray, amplitude: float = 1.5, seed: int = 0) -> np.ndarray:
    """Wobble the outlines like a segmentation model does: a smooth random field (about
    ``amplitude`` pixels) is added to the signed distance from the outline."""
    rng = np.random.default_rng(seed)
    m = mask.astype(bool)
    signed = ndi.distance_transform_edt(m) - ndi.distance_transform_edt(~m)
    noise = ndi.gaussian_filter(rng.normal(size=m.shape), 1.5)
    noise *= amplitude / (noise.std() + 1e-12)
    return (signed + noise) > 0.0


# --------------------------------------------------------------------------- roads


def road_network(h: int = 400, w: int = 400):
    """A crossing, a T junction and a curving road; returns (mask, axes, junctions, widths).

    ``axes`` are LineStrings of the true road axes in pixel coordinates (x = column + 0.5 at a
    pixel centre); ``widths`` their widths in pixels (5-15).
    """
    import shapely

    axes = []
    widths = []
    # horizontal road across the scene, width 11
    axes.append(shapely.LineString([(0, 120.5), (w, 120.5)]))
    widths.append(11)
    # vertical road crossing it, width 7
    axes.append(shapely.LineString([(150.5, 0), (150.5, h)]))
    widths.append(7)
    # a curving road from the left edge to the vertical road, width 9 (T junction)
    t = np.linspace(0, 1, 200)
    xs = t * 150.5
    ys = 300 + 40 * np.sin(t * math.pi)
    axes.append(shapely.LineString(np.column_stack([xs, ys])))
    widths.append(9)
    # a diagonal road from the horizontal road to the bottom-right corner, width 15
    axes.append(shapely.LineString([(260.0, 120.5), (w, h - 60.0)]))
    widths.append(15)
    # an isolated curved road (arc), width 5
    ang = np.linspace(math.pi * 0.1, math.pi * 0.9, 120)
    arc = np.column_stack([300 + 70 * np.cos(ang), 380 - 90 * np.sin(ang)])
    axes.append(shapely.LineString(arc))
    widths.append(5)
    polys = [a.buffer(wd / 2.0, cap_style="flat") for a, wd in zip(axes, widths, strict=True)]
    mask = burn((h, w), polys).astype(bool)
    junctions = [(150.5, 120.5), (150.5, 300.0), (260.0, 120.5)]
    return mask, axes, junctions, widths


# --------------------------------------------------------------------------- benchmark scene


def benchmark_block(rows: int, width: int, seed: int, objects_per_mpx: float = 1000.0):
    """A band of a busy urban class map: background, buildings, roads, trees, water.

    About ``objects_per_mpx`` separate objects per million pixels (buildings and tree blobs,
    plus road segments), so a 10k×10k raster holds ~100k objects.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, width), dtype=np.uint8)
    n = int(objects_per_mpx * rows * width / 1e6)
    n_build = int(n * 0.6)
    ys = rng.integers(0, rows, n_build)
    xs = rng.integers(0, width, n_build)
    hs = rng.integers(6, 30, n_build)
    ws = rng.integers(6, 30, n_build)
    for y, x, hh, ww in zip(ys, xs, hs, ws, strict=True):
        out[y : y + hh, x : x + ww] = 1
    # roads: a few long horizontal and vertical strips
    for _ in range(max(1, rows // 400)):
        y = int(rng.integers(0, max(1, rows - 12)))
        out[y : y + int(rng.integers(6, 14)), :] = 2
    for _ in range(max(1, width // 600)):
        x = int(rng.integers(0, max(1, width - 12)))
        out[:, x : x + int(rng.integers(6, 14))] = 2
    # trees: small noisy blobs
    n_tree = n - n_build
    ty = rng.integers(0, rows, n_tree)
    tx = rng.integers(0, width, n_tree)
    r = rng.integers(2, 8, n_tree)
    yy, xx = np.ogrid[-8:9, -8:9]
    for y, x, rr in zip(ty, tx, r, strict=True):
        disk = (yy * yy + xx * xx) <= rr * rr
        y0, x0 = y - 8, x - 8
        ys0, xs0 = max(0, y0), max(0, x0)
        ys1, xs1 = min(rows, y0 + 17), min(width, x0 + 17)
        sub = disk[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]
        view = out[ys0:ys1, xs0:xs1]
        view[sub & (view == 0)] = 3
    return out
