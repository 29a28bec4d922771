"""Topology-preserving simplification, window by window, seams held fixed.

Per-feature Douglas–Peucker (what most peers do) moves a shared boundary differently for the
two polygons on either side of it, opening gaps and overlaps. Here every window's *full*
coverage (all classes, nodata included, as polygonized) is simplified together with shapely's
``coverage_simplify`` (GEOS ≥ 3.12, Visvalingam–Whyatt on shared edges), so each shared edge is
simplified once for both neighbours. ``simplify_boundary=False`` pins the window's rectangle, so
the seam edges a polygon shares with its continuation in the next window stay identical and the
pieces still merge exactly. Vertices on a seam are therefore kept: a small, documented price for
bounded memory.
"""

from __future__ import annotations

import numpy as np
import shapely


def simplify_coverage(polys_px: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Simplify a gap-free coverage of one window (pixel coordinates), window edge fixed.

    ``coverage_simplify`` needs edge-matched input (the same vertices on both sides of every
    shared edge). Polygonize output only has vertices where its own outline turns, so the
    outlines are first densified to every pixel corner: then every node of the coverage is a
    vertex of every polygon that touches it.
    """
    if len(polys_px) == 0 or tolerance_px <= 0:
        return polys_px
    dense = shapely.segmentize(polys_px, 1.0)
    out = shapely.coverage_simplify(dense, float(tolerance_px), simplify_boundary=False)
    # Drop the densifying vertices left on the fixed window edge (exactly collinear, so removing
    # them moves no boundary and cannot open a gap).
    out = shapely.simplify(out, 0.0)
    bad = ~shapely.is_valid(out)
    if bad.any():  # not expected for a valid coverage; never write an invalid geometry
        out[bad] = shapely.make_valid(out[bad])
    return out
