"""Regularized outlines kept off the other features of their class.

A squared-up building may spill a pixel or two past its segmented outline. Where the spill
reaches another feature of its class (a speck touching it at a corner, a neighbour across a
one-pixel gap), the two would overlap in one layer. So each moved outline is cut back to its
*cell*: the pixels nearer to its own pixels than to any other feature's pixels of its class
(Euclidean distance between pixel centres; a tie goes to neither; components that the minimum
area drops are nobody's). Cells of different features are
disjoint and depend on the raster alone, so cut outlines neither overlap one another nor cover
another feature's pixels, whichever window or process finishes them.

Everything here is in pixel coordinates (x = column, y = row) of the whole raster.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import shapely
from rasterio.features import rasterize
from rasterio.transform import Affine
from scipy import ndimage as ndi

from crossearth_cli.vector.polygonize import shapes_px

Reader = Callable[[int, int, int, int], np.ndarray]  # (row, col, height, width) → class ids


@dataclass(frozen=True)
class Features:
    """Which pixels of a class make the features of its layer."""

    size: tuple[int, int]  # the raster's height and width
    connectivity: int = 4
    min_area_m2: float = 0.0  # smaller components are dropped: they are nobody's pixels
    area_m2: Callable[[np.ndarray], np.ndarray] | None = None  # pixel polygons → m²
    filled: bool = False  # holes were filled: features hold pixels the raster gives other classes


def owned_pixels(own: np.ndarray, other: np.ndarray, own_distance=None) -> np.ndarray:
    """Pixels strictly nearer to ``own`` than to ``other`` (boolean masks of one shape);
    ``own_distance``: ``own``'s distance transform, when the caller has it already."""
    if not other.any():
        return np.ones(own.shape, dtype=bool)
    if own_distance is None:
        own_distance = ndi.distance_transform_edt(~own)
    return own_distance < ndi.distance_transform_edt(~other)


def cut_to_cell(moved, exact, values: np.ndarray, row: int, col: int, class_id: int,
                features: Features):
    """``moved`` less the pixels of ``values`` (a patch whose top-left pixel is ``(row, col)``)
    that are not in ``exact``'s cell among the features of ``class_id``.

    Returns the cut outline and how far (pixels) the farthest pixel ``moved`` touches lies from
    ``exact``'s pixels: the patch must reach at least that far past ``moved`` for the cell to
    be right, since a nearer pixel of the class outside it would have been missed.
    """
    h, w = values.shape
    to_patch = Affine.translation(col, row)
    own = _mask(exact, (h, w), to_patch, all_touched=False)  # pixel centres inside
    covered = _mask(moved, (h, w), to_patch, all_touched=True)
    if not own.any():
        return moved, math.inf
    own_distance = ndi.distance_transform_edt(~own)
    reach = float(own_distance[covered].max())
    other = (values == class_id) & ~own
    if features.min_area_m2 > 0 and other.any():
        other &= ~_dropped(other, row, col, features)
    lost = covered & ~owned_pixels(own, other, own_distance)
    if not lost.any():
        return moved, reach
    squares, _ = shapes_px(lost.view(np.uint8), lost, 4, row, col)
    return shapely.difference(moved, shapely.union_all(squares)), reach


def _dropped(other: np.ndarray, row: int, col: int, features: Features) -> np.ndarray:
    """Pixels of components wholly inside the patch that fall under the minimum area: they
    make no feature, so an outline may cover them."""
    structure = np.ones((3, 3), bool) if features.connectivity == 8 else None
    labels, n = ndi.label(other, structure=structure)
    h, w = other.shape
    height, width = features.size
    cut_off = [labels[0] if row > 0 else (), labels[-1] if row + h < height else (),
               labels[:, 0] if col > 0 else (), labels[:, -1] if col + w < width else ()]
    whole = np.ones(n + 1, dtype=bool)
    whole[0] = False
    for edge in cut_off:
        whole[np.asarray(edge, dtype=np.int64)] = False
    if not whole.any():
        return np.zeros_like(other)
    inside = whole[labels]
    if features.filled:
        # measured with their holes filled, never less than the output measures them: a
        # component kept there is never taken for dropped here
        labels = np.where(inside, labels, 0)
        for k in np.nonzero(whole)[0]:
            labels[ndi.binary_fill_holes(labels == k)] = k
        inside = labels > 0
    parts, owner = shapes_px(labels.astype(np.int32), inside, features.connectivity, row, col)
    area = np.zeros(n + 1)
    np.add.at(area, owner, features.area_m2(parts))
    small = whole & (area < features.min_area_m2)
    return small[labels]


def _still_fits(cut, moved, exact, max_area_change: float) -> bool:
    """A cut outline is kept when it is as whole as before and its area as close to the
    segmented one as regularization asks of any outline."""
    parts = shapely.get_num_geometries
    return (cut.geom_type in ("Polygon", "MultiPolygon") and not cut.is_empty
            and parts(cut) <= max(parts(moved), parts(exact))
            and abs(cut.area - exact.area) <= max_area_change * exact.area)


def _mask(geom, shape, transform, all_touched: bool) -> np.ndarray:
    return rasterize([geom], out_shape=shape, transform=transform, fill=0, default_value=1,
                     all_touched=all_touched, dtype="uint8").astype(bool)


def keep_to_cells(moved: np.ndarray, exact: np.ndarray, class_id: np.ndarray, read: Reader,
                  features: Features, margin: int, max_area_change: float) -> np.ndarray:
    """Each moved outline cut back to its cell, or None where the cut would split it, empty
    it or take its area more than ``max_area_change`` (relative) from the segmented one.

    ``margin`` (pixels) is how far past an outline the first patch reaches; a patch is read
    again wider when the outline lies farther than that from its own pixels.
    """
    height, width = features.size
    out = np.empty(len(moved), dtype=object)
    for k, (g, e, c) in enumerate(zip(moved, exact, class_id, strict=True)):
        (gx0, gy0, gx1, gy1), (ex0, ey0, ex1, ey1) = g.bounds, e.bounds
        x0, y0, x1, y1 = min(gx0, ex0), min(gy0, ey0), max(gx1, ex1), max(gy1, ey1)
        pad = margin
        while True:
            r0, c0 = max(0, math.floor(y0) - pad), max(0, math.floor(x0) - pad)
            r1, c1 = min(height, math.ceil(y1) + pad), min(width, math.ceil(x1) + pad)
            values = read(r0, c0, r1 - r0, c1 - c0)
            if not features.filled and _alone(g, e, values == c, pad):
                cut = g
                break
            cut, reach = cut_to_cell(g, e, values, r0, c0, int(c), features)
            whole = r0 == 0 and c0 == 0 and r1 == height and c1 == width
            if reach < pad or whole or not math.isfinite(reach):
                break
            pad = math.ceil(reach) + 1
        out[k] = cut if cut is g or _still_fits(cut, g, e, max_area_change) else None
    return out


def _alone(moved, exact, same: np.ndarray, pad: int) -> bool:
    """The quick answer for most outlines: the patch holds no pixel of the class but the
    outline's own (as many as its area), and every pixel ``moved`` touches is nearer than
    ``pad`` to them, so no pixel of the class beyond the patch could be nearer.

    A pixel centre ``moved`` touches is within 0.71 px of it; any point of ``moved`` is within
    ``stray`` of ``exact``, and any point of ``exact`` within 0.71 px of one of its centres.
    ``stray`` is measured cheaply and from above: from points every pixel along ``moved``
    (0.5 px more between them) to ``exact`` simplified by a pixel (1 px more), plus the
    inradius of ``exact``'s largest hole (inside which ``moved``'s outline is not sampled).
    """
    if np.count_nonzero(same) != round(exact.area):
        return False
    samples = shapely.points(shapely.get_coordinates(shapely.segmentize(moved, 1.0)))
    stray = float(shapely.distance(shapely.simplify(exact, 1.0), samples).max()) + 1.5
    holes = [ring.bounds for part in shapely.get_parts(exact) for ring in part.interiors]
    if holes:
        stray += 0.5 * max(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in holes)
    return stray + 1.5 < pad
