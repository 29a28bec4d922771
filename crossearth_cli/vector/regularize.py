"""Building regularization: right-angled outlines aligned to the dominant orientation.

Works in a metric frame (pixel space scaled to metres per axis, so right angles are right
angles on the ground). For each polygon:

1. the dominant orientation is the length-weighted circular mean of its edge directions taken
   modulo 90° (edges of a lightly simplified outline, so pixel stairs do not dominate);
2. the outline is rotated to that orientation and simplified (Douglas–Peucker, ~1 pixel);
3. every edge is labelled horizontal or vertical; consecutive edges with the same label form a
   *run*, placed at the length-weighted mean of its edges (which keeps the area close to the
   original); runs shorter than ``min_run`` (pixel noise, chamfered corners) are dissolved into
   their neighbours;
4. corners are the intersections of consecutive runs; the result is rotated back.

Holes are regularized the same way with the building's orientation (runs scaled to the hole's
own size). A candidate is kept only if it stays close to the segmented outline everywhere, not
just on average: no part of it lies more than ``max_shift`` outside the outline or inside it, and
its area is within ``MAX_AREA_CHANGE``. IoU alone let a rectangle square off a corner that the
scene's nodata edge (or a neighbour) had cut, covering pixels that were never building. When no
candidate qualifies (IoU below ``MIN_IOU`` included), the unregularized outline is kept —
regularization never makes a building worse than it was.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
from shapely import affinity

MIN_IOU = 0.7
ROUND_HULL_FILL = 0.9  # see is_round
ROUND_HULL_QUOTIENT = 0.93
SIMPLER_SLACK = 0.02  # IoU a simpler outline may give up to be preferred
MAX_AREA_CHANGE = 0.05  # relative
MAX_SHIFT_M = 3.0  # the most an edge or corner may move on a big building, metres
# Outlines smaller than a 3×3 block are kept as they are: pixel outlines (right-angled on the
# grid already), too small for an orientation or a run of min_run (3 px). On a speckled map
# most polygons are such specks, each ~1 ms for little or no change (two thirds of the time).
SPECK_PX = 9.0


def max_shift(pixel: float, min_run: float) -> float:
    """How far a regularized outline may stray from the segmented one (metric units).

    Three pixels on small buildings (a pixel of noise on both sides of an edge placed at its
    mean); on big ones half the shortest run kept (a dissolved chamfer moves the corner about
    that far), but never more than ``MAX_SHIFT_M``.
    """
    return max(3.0 * pixel, min(0.5 * min_run, MAX_SHIFT_M))


def stays_close(cand, ref, shift: float, slack: float, speck: float) -> bool:
    """True when no part of ``ref`` lies more than ``shift`` outside ``cand`` and no part of
    ``cand`` deeper than ``shift`` inside it lies outside ``ref``, up to ``slack`` area each
    (pixel noise along the outline), and nothing beyond twice the shift, up to ``speck``
    (so a long outline's slack cannot hide one deep spill).

    This bounds how far any part of the outline moved, which IoU does not. Only the candidate
    (a handful of right-angled vertices) is buffered, which keeps it cheap.
    """
    for reach, allowed in ((shift, slack), (2.0 * shift, speck)):
        inner = shapely.buffer(cand, -reach, join_style="mitre")
        if shapely.difference(inner, ref).area > allowed:
            return False
        outer = shapely.buffer(cand, reach, join_style="mitre")
        if shapely.difference(ref, outer).area > allowed:
            return False
    return True


def dominant_angle(poly, tol: float) -> float:
    """Orientation in radians in [-pi/4, pi/4): where the outline's edges mostly point."""
    ring = shapely.simplify(poly.exterior, tol)
    xy = np.asarray(ring.coords)
    if len(xy) < 3:
        xy = np.asarray(poly.exterior.coords)
    d = np.diff(xy, axis=0)
    length = np.hypot(d[:, 0], d[:, 1])
    theta = np.arctan2(d[:, 1], d[:, 0])
    z = np.sum(length * np.exp(4j * theta))
    if abs(z) < 1e-12:
        return 0.0
    return float(np.angle(z) / 4.0)


def _runs(xy: np.ndarray, min_run: float):
    """Horizontal/vertical runs of a closed, axis-roughly-aligned ring (rotated frame)."""
    d = np.diff(xy, axis=0)
    mid = (xy[:-1] + xy[1:]) / 2.0
    horiz = np.abs(d[:, 0]) >= np.abs(d[:, 1])
    runs: list[list] = []  # [is_horizontal, weight, weighted coordinate sum]
    for k in range(len(d)):
        h = bool(horiz[k])
        w = abs(d[k, 0]) if h else abs(d[k, 1])
        c = mid[k, 1] if h else mid[k, 0]
        w_eff = max(w, 1e-9)
        if runs and runs[-1][0] == h:
            runs[-1][1] += w_eff
            runs[-1][2] += w_eff * c
        else:
            runs.append([h, w_eff, w_eff * c])
    if len(runs) > 1 and runs[0][0] == runs[-1][0]:
        first = runs.pop(0)
        runs[-1][1] += first[1]
        runs[-1][2] += first[2]
    # Dissolve short runs (noise jogs, chamfers): a run's real length is the distance between
    # its two neighbours' positions; its neighbours share an orientation and become one run.
    while len(runs) > 4 and len(runs) % 2 == 0:
        n = len(runs)
        pos = [r[2] / r[1] for r in runs]
        extent = [abs(pos[(i + 1) % n] - pos[(i - 1) % n]) for i in range(n)]
        k = min(range(n), key=lambda i: extent[i])
        if extent[k] >= min_run:
            break
        prev, nxt = (k - 1) % n, (k + 1) % n
        runs[prev][1] += runs[nxt][1]
        runs[prev][2] += runs[nxt][2]
        for idx in sorted({k, nxt}, reverse=True):
            runs.pop(idx)
    return runs


def _ring_from_runs(runs) -> np.ndarray | None:
    n = len(runs)
    if n < 4 or n % 2:
        return None
    pts = []
    for k in range(n):
        a, b = runs[k], runs[(k + 1) % n]
        if a[0] == b[0]:
            return None
        ya = a[2] / a[1]
        yb = b[2] / b[1]
        pts.append((yb, ya) if a[0] else (ya, yb))
    pts.append(pts[0])
    return np.asarray(pts)


def _regularize_ring(xy: np.ndarray, tol: float, min_run: float) -> np.ndarray | None:
    ring = shapely.simplify(shapely.linearrings(xy), tol)
    pts = np.asarray(ring.coords)
    if len(pts) < 5:
        pts = xy
    return _ring_from_runs(_runs(pts, min_run))


def iou(a, b) -> float:
    inter = shapely.intersection(a, b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def _mrr_angle(poly) -> float:
    """Orientation of the minimum rotated rectangle, folded into [-pi/4, pi/4)."""
    rect = shapely.oriented_envelope(poly)
    if rect.geom_type != "Polygon":
        return 0.0
    xy = np.asarray(rect.exterior.coords)
    d = xy[1] - xy[0]
    a = math.atan2(d[1], d[0])
    return (a + math.pi / 4) % (math.pi / 2) - math.pi / 4


def _regularize_at(poly, angle, tol, min_run, pixel):
    origin = poly.centroid
    rot = affinity.rotate(poly, -angle, origin=origin, use_radians=True)
    shell = _regularize_ring(np.asarray(rot.exterior.coords), tol, min_run)
    if shell is None:
        return None
    cand = shapely.Polygon(shell)
    if not cand.is_valid or cand.is_empty:
        return None
    holes = []
    for interior in rot.interiors:
        xy = np.asarray(interior.coords)
        area = shapely.Polygon(xy).area
        if area <= (3.0 * pixel) ** 2:
            continue  # a speck, not a courtyard
        h = _regularize_ring(xy, tol, max(3.0 * pixel, 0.12 * math.sqrt(area)))
        holes.append(h if h is not None else xy)
    if holes:
        with_holes = shapely.Polygon(shell, holes)
        if with_holes.is_valid:
            cand = with_holes
    return affinity.rotate(cand, angle, origin=origin, use_radians=True)


def regularize_polygon(poly, pixel: float = 1.0, min_run: float | None = None):
    """One building outline (metric frame) → right-angled outline, or ``poly`` if that fails.

    Two orientations are tried — the dominant edge direction and the minimum rotated
    rectangle's — and the right-angled outline closer to the input (IoU) wins.
    """
    if poly.is_empty or poly.area < SPECK_PX * pixel * pixel:
        return poly
    if poly.geom_type == "MultiPolygon":
        geoms = list(poly.geoms)
        parts = [regularize_polygon(p, pixel, min_run) for p in geoms]
        if all(a is b for a, b in zip(parts, geoms, strict=True)):
            return poly
        out = shapely.union_all(parts)
        return out if out.is_valid else poly
    if is_round(poly, pixel):
        return poly  # a tank, a silo: a right-angled outline would square it off
    tol = 1.5 * pixel
    if min_run is None:
        # Jogs shorter than this are noise: 3 pixels, more on big buildings (12 % of the side
        # of a square of the same area), so a wobbly outline does not become a staircase.
        min_run = max(3.0 * pixel, 0.12 * math.sqrt(poly.area))
    # Pixel stairs make IoU expensive; half a pixel of simplification changes it by ~nothing.
    ref = shapely.simplify(poly, 0.5 * pixel)
    angles = [dominant_angle(poly, 2.0 * pixel)]
    a2 = _mrr_angle(poly)
    if abs(math.remainder(a2 - angles[0], math.pi / 2)) > math.radians(0.5):
        angles.append(a2)
    cands = [_regularize_at(poly, a, tol, min_run, pixel) for a in angles]
    cands.append(shapely.oriented_envelope(poly))
    scored = []
    for cand in cands:
        if cand is None or cand.geom_type != "Polygon" or not cand.is_valid:
            continue
        cand = _keep_area(cand, poly.area, pixel)
        if abs(cand.area - poly.area) <= MAX_AREA_CHANGE * poly.area:
            scored.append((iou(cand, ref), shapely.get_num_coordinates(cand), cand))
    scored = [s for s in scored if s[0] >= MIN_IOU]
    if not scored:
        return poly
    # Preferred: among outlines about as close as the best, the simplest (a rectangle when it
    # fits); then the rest, closest first. The first that stays close everywhere wins.
    best = max(s[0] for s in scored)
    close = sorted((s for s in scored if s[0] >= best - SIMPLER_SLACK), key=lambda s: (s[1], -s[0]))
    rest = sorted((s for s in scored if s[0] < best - SIMPLER_SLACK), key=lambda s: -s[0])
    shift = max_shift(pixel, min_run)
    # Spikes of pixel noise along the outline may poke past the shift: a tenth of a pixel
    # per pixel of outline, at least two pixels' worth.
    slack = max(2.0 * pixel * pixel, 0.1 * pixel * ref.length)
    for _, _, cand in close + rest:
        if stays_close(cand, ref, shift, slack, speck=4.0 * pixel * pixel):
            return cand
    return poly


def _keep_area(cand, area: float, pixel: float):
    """Offset the outline (mitred, so corners stay square) until it has the input's area."""
    perim = cand.length
    if perim <= 0:
        return cand
    delta = (area - cand.area) / perim
    if abs(delta) < 1e-9 or abs(delta) > 2.0 * pixel:
        return cand
    moved = cand.buffer(delta, join_style="mitre", mitre_limit=10.0)
    if moved.geom_type != "Polygon" or not moved.is_valid:
        return cand
    return shapely.simplify(moved, 0.0)


def is_round(poly, pixel: float = 1.0) -> bool:
    """Convex (≥ ``ROUND_HULL_FILL`` of its hull) and with a round hull (isoperimetric
    quotient 4πA/P² ≥ ``ROUND_HULL_QUOTIENT``: 1 for a circle, 0.95 for an octagon, 0.79 for
    a square, less for an L): a tank or a silo, which a right-angled outline would square off
    (IoU with a true circle fell from 0.92-0.98 to 0.83). Pixel noise is opened away first."""
    core = poly.buffer(-pixel, join_style="mitre").buffer(pixel, join_style="mitre")
    if core.is_empty:
        return False
    hull = core.convex_hull
    if hull.area <= 0 or core.area < ROUND_HULL_FILL * hull.area:
        return False
    return 4.0 * math.pi * hull.area / hull.length**2 >= ROUND_HULL_QUOTIENT


def regularize(polys_m: np.ndarray, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Regularized outlines, and which ones changed (the others are returned untouched)."""
    out = np.empty(len(polys_m), dtype=object)
    changed = np.zeros(len(polys_m), dtype=bool)
    for k, p in enumerate(polys_m):
        out[k] = regularize_polygon(p, pixel)
        changed[k] = out[k] is not p
    return out, changed


def corner_angles(poly) -> np.ndarray:
    """Interior turning angles (degrees) at every vertex of every ring — for checks and tests."""
    angles = []
    rings = [poly.exterior, *poly.interiors] if poly.geom_type == "Polygon" else []
    for ring in rings:
        xy = np.asarray(ring.coords)[:-1]
        n = len(xy)
        for k in range(n):
            a = xy[k - 1] - xy[k]
            b = xy[(k + 1) % n] - xy[k]
            cosang = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300)
            angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cosang)))))
    return np.asarray(angles)
