"""Window grid and blend weights (pure functions)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossearth_cli.raster.windows import (
    stride_from_overlap,
    tile_count,
    tile_grid,
    tile_weights,
    window_starts,
)


def mmseg_starts(size, crop, stride):
    """Transcription of the index arithmetic in mmseg's EncoderDecoder.slide_inference."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(grids):
        y1 = i * stride
        y2 = min(y1 + crop, size)
        y1 = max(y2 - crop, 0)
        out.append(y1)
    return out


@given(st.integers(1, 3000), st.integers(16, 1024), st.integers(1, 1024))
def test_window_starts_follow_mmseg(size, crop, stride):
    stride = min(stride, crop)
    starts = window_starts(size, crop, stride)
    assert starts == mmseg_starts(size, crop, stride)
    # last window ends flush with the edge and every pixel is covered
    assert starts[-1] + min(crop, size) == size
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + crop] = True
    assert covered.all()


def test_known_grid_512_341():
    assert window_starts(1500, 512, 341) == [0, 341, 682, 988]
    assert window_starts(300, 512, 341) == [0]  # smaller than a tile: one window, no padding
    grid = tile_grid(300, 1500, 512, 341)
    assert len(grid) == 1 and len(grid[0]) == 4
    assert all(t.h == 300 and t.w == 512 for t in grid[0])
    assert tile_count(1500, 1500, 512, 341) == 16


@settings(max_examples=60, deadline=None)
@given(  # scenes up to 240 px: at stride 1 a 400² scene is ~150,000 tiles (30 s on its own)
    st.integers(1, 240), st.integers(1, 240), st.integers(16, 128), st.floats(0.05, 1.0),
    st.sampled_from(["gaussian", "cosine"]),
)
def test_smooth_weights_cover_every_pixel_and_are_one_at_the_scene_edge(h, w, tile, frac, mode):
    stride = max(1, int(tile * frac))
    grid = tile_grid(h, w, tile, stride)
    total = np.zeros((h, w))
    for row in grid:
        for t in row:
            wt = tile_weights(t, h, w, tile, stride, mode)
            assert wt.shape == (t.h, t.w)
            assert (wt > 0).all() and (wt <= 1).all()
            total[t.slices] += wt
            # sides on the scene boundary keep full weight: no dark frame
            if t.y == 0:
                assert np.allclose(wt[0, :], tile_weights(t, h, w, tile, stride, mode)[0, :])
                assert (wt[0] == wt[min(t.h - 1, 0)]).all()
    assert (total > 0).all()
    # the outermost ring of the scene is covered by weight-1 taper sides along its normal
    first = grid[0][0]
    wt = tile_weights(first, h, w, tile, stride, mode)
    assert wt[0, 0] == pytest.approx(1.0)


def test_taper_is_one_at_boundary_and_ramps_inside():
    grid = tile_grid(1000, 1000, 512, 341)
    t = grid[0][0]
    wt = tile_weights(t, 1000, 1000, 512, 341, "cosine")
    assert wt[0, 0] == 1.0 and wt[0, 100] == 1.0 and wt[100, 0] == 1.0
    assert wt[-1, -1] < 0.01  # interior corner fades out
    assert wt[-1, 0] < 0.01 and wt[0, -1] < 0.01
    mean = tile_weights(t, 1000, 1000, 512, 341, "mean")
    assert (mean == 1).all()


def test_stride_from_overlap():
    assert stride_from_overlap(512, 1 / 3) == 341
    assert stride_from_overlap(512, 171) == 341
    with pytest.raises(ValueError):
        stride_from_overlap(512, 512)
    with pytest.raises(ValueError, match="whole pixels"):  # 1.5 is neither: not 2 px silently
        stride_from_overlap(512, 1.5)


def test_column_stripes_cover_the_width_once_with_block_aligned_edges():
    from crossearth_cli.raster.windows import column_stripes

    cases = [(20000, 512, 341, 8192), (700, 48, 30, 96), (513, 512, 341, 8192)]
    for width, tile, stride, max_w in cases:
        row = tile_grid(64, width, tile, stride)[0]
        stripes = column_stripes(row, width, max_w, block=16 if tile < 100 else 512)
        assert stripes[0].c0 == 0 and stripes[-1].c1 == width
        for a, b in zip(stripes, stripes[1:]):
            assert a.c1 == b.c0 and a.c1 % (16 if tile < 100 else 512) == 0
        for s in stripes:
            tiles = row[s.first_col : s.end_col]
            assert s.x0 <= s.c0 and s.x1 >= s.c1  # the band covers what the stripe writes
            # every tile touching the written columns runs, and no other
            touching = [t for t in row if t.x < s.c1 and t.x + t.w > s.c0]
            assert tiles == touching
