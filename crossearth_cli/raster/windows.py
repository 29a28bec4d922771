"""Window grids and blend weights: pure functions, no I/O.

The grid follows mmseg's ``slide_inference`` exactly (so ``--blend mean`` reproduces the paper's
numbers): ``n = max(size - tile + stride - 1, 0) // stride + 1`` windows per axis, window ``i``
starts at ``i * stride`` and the last one is pushed back to end flush with the scene edge. A scene
smaller than a tile gets one window the size of the scene.

Smooth blending weights each tile with a separable taper that ramps up over the overlap with the
neighbouring window on interior sides only; sides that touch the scene boundary keep weight 1,
so there is no dark frame and every pixel has a positive total weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

BLEND_MODES = ("gaussian", "cosine", "mean")


@dataclass(frozen=True)
class Tile:
    """One window of the grid: ``row``/``col`` index it, ``y``/``x``/``h``/``w`` place it."""

    row: int
    col: int
    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis, mmseg's rule (last window flush with the edge)."""
    if size <= 0 or tile <= 0 or stride <= 0:
        raise ValueError(f"size, tile and stride must be positive (got {size}, {tile}, {stride})")
    n = max(size - tile + stride - 1, 0) // stride + 1
    starts = []
    for i in range(n):
        end = min(i * stride + tile, size)
        starts.append(max(end - tile, 0))
    return starts


def tile_grid(height: int, width: int, tile: int, stride: int) -> list[list[Tile]]:
    """Row-major grid of tiles: one list per tile row."""
    th, tw = min(tile, height), min(tile, width)
    ys, xs = window_starts(height, tile, stride), window_starts(width, tile, stride)
    return [
        [Tile(row=r, col=c, y=y, x=x, h=th, w=tw) for c, x in enumerate(xs)]
        for r, y in enumerate(ys)
    ]


def _ramp(length: int, mode: str) -> np.ndarray:
    """Rising half of the taper over ``length`` pixels, strictly inside (0, 1]."""
    t = (np.arange(length, dtype=np.float64) + 0.5) / length  # pixel centres in (0, 1)
    if mode == "cosine":
        return 0.5 - 0.5 * np.cos(np.pi * t)
    if mode == "gaussian":
        # A Gaussian edge: weight exp(-(1-t)^2 / (2 s^2)) with s = 1/3 of the overlap, so the
        # outermost pixel of the overlap gets ~1% and the inner end reaches 1 smoothly.
        return np.exp(-((1.0 - t) ** 2) / (2 * (1.0 / 3.0) ** 2))
    raise ValueError(f"unknown taper {mode!r}")


def axis_overlaps(starts: tuple[int, ...], index: int, tile: int) -> tuple[int, int]:
    """Pixels window ``index`` shares with the previous and with the next window."""
    before = starts[index - 1] + tile - starts[index] if index > 0 else 0
    after = starts[index] + tile - starts[index + 1] if index < len(starts) - 1 else 0
    return max(before, 0), max(after, 0)


@lru_cache(maxsize=256)
def taper(length: int, before: int, after: int, mode: str) -> np.ndarray:
    """1-D weights of a window of ``length`` pixels overlapping its neighbours as given.

    Sides without a neighbour (scene boundary) keep weight 1.
    """
    w = np.ones(length, dtype=np.float64)
    if mode == "mean":
        return w
    if before:
        w[:before] = np.minimum(w[:before], _ramp(before, mode))
    if after:
        w[length - after :] = np.minimum(w[length - after :], _ramp(after, mode)[::-1])
    return w


def tile_weights(
    tile: Tile, height: int, width: int, tile_size: int, stride: int, mode: str
) -> np.ndarray:
    """2-D float32 weights (h×w) of ``tile`` in a scene of ``height``×``width``."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)} (got {mode!r})")
    ys = tuple(window_starts(height, tile_size, stride))
    xs = tuple(window_starts(width, tile_size, stride))
    return taper_2d(tile.h, tile.w, axis_overlaps(ys, tile.row, tile.h),
                    axis_overlaps(xs, tile.col, tile.w), mode)


def taper_2d(h: int, w: int, oy: tuple[int, int], ox: tuple[int, int], mode: str) -> np.ndarray:
    """The h×w float32 weights of a tile overlapping its neighbours by ``oy`` (top, bottom)
    and ``ox`` (left, right) pixels: the blend's weights, as the engine adds tiles with them."""
    return np.outer(taper(h, *oy, mode), taper(w, *ox, mode)).astype(np.float32)


def stride_from_overlap(tile: int, overlap: float) -> int:
    """Stride for an overlap given as a fraction of the tile (0.33) or in pixels (171)."""
    if not math.isfinite(overlap) or overlap < 0 or (overlap >= 1 and overlap != int(overlap)):
        raise ValueError("overlap must be a fraction of the tile below 1 (0.33) or whole pixels "
                         "(171)")
    px = overlap * tile if overlap < 1 else overlap
    stride = tile - int(round(px))
    if stride < 1:
        raise ValueError(f"overlap {overlap} leaves no stride for tile {tile}")
    return stride


def tile_count(height: int, width: int, tile: int, stride: int) -> int:
    return len(window_starts(height, tile, stride)) * len(window_starts(width, tile, stride))


@dataclass(frozen=True)
class ColumnStripe:
    """Tile columns ``first_col .. end_col`` cover pixel columns ``x0 .. x1`` (the band), and
    the stripe writes output columns ``c0 .. c1`` (block-aligned, disjoint between stripes)."""

    first_col: int
    end_col: int
    x0: int
    x1: int
    c0: int
    c1: int


def column_stripes(row: list[Tile], width: int, max_width: int, block: int = 512,
                   span: tuple[int, int] | None = None) -> list[ColumnStripe]:
    """Split a wide scene into vertical stripes run one after another, so the row band holds
    at most ``max_width`` output columns (plus the tiles reaching over its edges).

    Each stripe runs every tile touching its output columns, so a pixel gets the same tiles,
    added in the same order, as in one pass over the whole width: the result is identical.
    Boundaries are multiples of ``block`` from the first output column, so each stripe writes
    whole output blocks. ``span=(c0, c1)``: only these columns are output (an AOI's).
    """
    start, end = span if span is not None else (0, width)
    out = end - start
    n = max(1, -(-out // max_width))
    bounds = sorted({start, end, *(start + min(out, round(k * out / n / block) * block)
                                   for k in range(1, n))})
    stripes = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        cols = [t for t in row if t.x < c1 and t.x + t.w > c0]
        stripes.append(ColumnStripe(cols[0].col, cols[-1].col + 1, cols[0].x,
                                    cols[-1].x + cols[-1].w, c0, c1))
    return stripes


__all__ = [
    "ColumnStripe",
    "column_stripes",
    "BLEND_MODES",
    "Tile",
    "window_starts",
    "tile_grid",
    "axis_overlaps",
    "taper",
    "tile_weights",
    "taper_2d",
    "stride_from_overlap",
    "tile_count",
]
