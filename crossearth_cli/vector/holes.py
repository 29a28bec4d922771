"""``--fill-holes``: small enclosed regions take the class that encloses them (raster domain).

A hole of class *k* is a connected region of non-*k* pixels that does not reach the raster's
edge, taken with everything it encloses (its size counts them too). Holes are found with the
complementary connectivity (4-connected regions have 8-connected holes and vice versa), which is
what makes a hole a hole in digital topology.

Working on pixels rather than polygons keeps every class layer a clean coverage: a small
polygon of another class inside a filled hole is absorbed, not left overlapping. Nested holes go
to the outermost enclosing class (the largest hole wins, and it holds the nested ones).

Windowed: a hole of *n* pixels spans at most *n* pixels, so with a halo of that many pixels
around the window every hole touching the window is seen whole and the result equals the
whole-raster one. The halo is capped (``MAX_HALO``). Beyond the cap, a window decides only the
holes every window sharing them decides alike: those no wider or taller than the halo, and those
inside a single window of the grid. Any other hole is left open whole: a window that happened to
see it entirely must not fill its part while a neighbour leaves the rest open along the seam.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MAX_HALO = 256

_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = ndi.generate_binary_structure(2, 2)


def halo_for(max_pixels: int) -> int:
    return int(min(max(max_pixels, 0), MAX_HALO))


def fill_small_holes(
    arr: np.ndarray,
    classes,
    max_pixels: int,
    connectivity: int,
    core: tuple[slice, slice] | None = None,
    grid: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Return ``arr`` with holes of fewer than ``max_pixels`` pixels filled, for each class.

    A region touching any border of ``arr`` is never filled: at a window cut it may continue
    outside, and at the raster's own edge it is not enclosed. Only pixels in ``core`` change.
    ``grid`` is ``(row_origin, col_origin, window_size, halo)`` when ``arr`` is a window of a
    bigger raster read with a halo smaller than ``max_pixels``: holes that another window could
    see only in part (see the module docstring) are then left open.
    """
    if max_pixels <= 1:
        return arr
    structure = _EIGHT if connectivity == 4 else _FOUR
    out = arr.copy()
    best = np.zeros(arr.shape, dtype=np.int64)
    target = np.zeros(arr.shape, dtype=arr.dtype)
    if core is None:
        core = (slice(0, arr.shape[0]), slice(0, arr.shape[1]))
    present = set(np.unique(arr).tolist())
    for k in classes:
        if k not in present:
            continue
        labels, n = _enclosed_regions(arr != k, structure)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < max_pixels
        small[0] = False
        if grid is not None and max_pixels > grid[3]:
            small &= _decided_alike(labels, small, grid)
        if not small.any():
            continue
        lab_core = labels[core]
        hole = small[lab_core]
        size_here = sizes[lab_core]
        better = hole & (size_here > best[core])
        best[core][better] = size_here[better]
        target[core][better] = k
    changed = best > 0
    out[changed] = target[changed]
    return out


def _enclosed_regions(other: np.ndarray, structure) -> tuple[np.ndarray, int]:
    """Labelled regions enclosed by the class: each hole together with everything inside it.

    A hole's own pixels exclude whatever it encloses (a building hole in the background does
    not contain the background courtyard inside the building); taking them with it makes the
    outermost enclosing class win for the nested content too.
    """
    labels, n = ndi.label(other, structure=structure)
    if n == 0:
        return labels, 0
    edge = np.zeros(n + 1, dtype=bool)
    edge[0] = True
    for side in (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]):
        edge[np.unique(side)] = True
    holes = ~edge[labels]
    if not holes.any():
        return np.zeros_like(labels), 0
    # the class and the outside connect with the opposite connectivity to the holes
    outside = _FOUR if structure is _EIGHT else _EIGHT
    filled = ndi.binary_fill_holes(holes, structure=outside)
    return ndi.label(filled, structure=structure)


def _decided_alike(labels: np.ndarray, candidates: np.ndarray, grid) -> np.ndarray:
    """Which candidate holes every window sharing them sees whole (so all decide alike)."""
    r_origin, c_origin, size, halo = grid
    ok = np.zeros_like(candidates)
    boxes = ndi.find_objects(labels)
    for i in np.flatnonzero(candidates):
        rows, cols = boxes[i - 1]
        if rows.stop - rows.start <= halo and cols.stop - cols.start <= halo:
            ok[i] = True
            continue
        r, c = rows.start + r_origin, cols.start + c_origin
        r1, c1 = rows.stop - 1 + r_origin, cols.stop - 1 + c_origin
        ok[i] = r // size == r1 // size and c // size == c1 // size
    return ok
