"""Peak memory depends on tile height and scene width, never on scene height."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import write_tif

CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{tests!r}, {benchmarks!r}]
    from pathlib import Path
    from helpers import per_pixel_spec
    from scenes import peak_rss_mb  # this process's own peak (a big pytest parent's is not)
    from crossearth_cli.engine import SegmentSettings, segment

    spec = per_pixel_spec(num_classes=6, crop=256, stride=170)
    base = peak_rss_mb()
    r = segment(SegmentSettings(input=Path({src!r}), output=Path({out!r}),
                                confidence=Path({out!r} + ".conf.tif"), batch_size=4), spec)
    print(json.dumps({{"base_mb": base, "peak_mb": peak_rss_mb(), "tiles": r.tiles}}))
    """
)


def _peak_rss_mb(tmp_path: Path, height: int, width: int) -> tuple[float, int]:
    rng = np.random.default_rng(height)
    img = rng.integers(0, 256, size=(3, height, width), dtype=np.uint8)
    src = write_tif(tmp_path / f"scene_{height}.tif", img, compress="deflate")
    del img
    code = CHILD.format(
        tests=str(Path(__file__).parent), benchmarks=str(Path(__file__).parents[1] / "benchmarks"),
        src=str(src), out=str(tmp_path / f"out_{height}.tif"),
    )
    # GDAL's block cache is a fixed-size LRU (32 MB by default here); a small cap keeps it
    # from filling up in the tall scene only, so what remains is the engine's own memory.
    env = {**os.environ, "GDAL_CACHEMAX": "16"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info["peak_mb"], info["tiles"]


def test_peak_memory_does_not_grow_with_scene_height(tmp_path):
    width = 2048
    short_mb, short_tiles = _peak_rss_mb(tmp_path, 2048, width)
    tall_mb, tall_tiles = _peak_rss_mb(tmp_path, 8192, width)
    assert tall_tiles > 3 * short_tiles
    # A scene-sized float32 score canvas for the tall scene would be 6 x 8192 x 2048 x 4 B =
    # 403 MB (plus 50 MB of input); the band stays at (6 + 2) x 4 x 256 x 2048 B = 17 MB.
    assert tall_mb - short_mb < 48, (short_mb, tall_mb)


def test_a_finished_feed_lets_its_last_strip_go(tmp_path):
    """The scene keeps its first stripe's feed to the end, so a wide scene's later stripes
    would run with that stripe's last strip (tile rows × stripe width) still held."""
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from crossearth_cli.raster.reader import SceneReader, StripFeed
    from crossearth_cli.raster.windows import tile_grid

    rng = np.random.default_rng(0)
    src = write_tif(tmp_path / "s.tif", rng.integers(1, 256, size=(3, 300, 200), dtype=np.uint8))
    with SceneReader(src) as reader, ThreadPoolExecutor(2) as pool:
        feed = StripFeed(reader, tile_grid(300, 200, 128, 96), pool)
        tiles = list(feed)
        n, (_, data, valid) = len(tiles), tiles[-1]
        strips = [weakref.ref(data.base), weakref.ref(valid.base)]
        del tiles, data, valid
        assert all(s() is not None for s in strips)  # the feed still holds its last strip
        feed.cancel()
        assert n > 4 and all(s() is None for s in strips)


@pytest.mark.parametrize("x0,x1,n,block", [(0, 512, 4, 256), (0, 16384, 4, 512),
                                           (0, 16384, 4, 16384), (100, 5000, 4, 256),
                                           (0, 3000, 8, 256), (300, 2500, 2, 1000),
                                           (4096, 8192, 3, 128), (0, 1, 4, 1)])
def test_column_chunks_cover_the_range_on_block_edges(x0, x1, n, block):
    """Parallel column reads never split a block between two threads (each would decompress
    it) and narrow reads are not split at all."""
    from crossearth_cli.raster.reader import MIN_CHUNK_COLUMNS, column_chunks

    chunks = column_chunks(x0, x1, n, block)
    assert chunks[0][0] == x0 and chunks[-1][1] == x1
    assert all(a < b for a, b in chunks)
    assert all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:]))  # contiguous
    assert all(b % block == 0 for _, b in chunks[:-1])  # cuts on block edges
    blocks = -(-x1 // block) - x0 // block
    assert len(chunks) <= max(1, min(n, blocks, (x1 - x0) // MIN_CHUNK_COLUMNS))
    if block >= x1 or x1 - x0 < 2 * MIN_CHUNK_COLUMNS:
        assert len(chunks) == 1
    if (x0, x1, n, block) == (0, 16384, 4, 512):
        assert [b - a for a, b in chunks] == [4096] * 4


def test_a_scene_is_opened_once_for_reading(tmp_path, monkeypatch):
    """The handle opened to inspect a file is the one its first read thread uses: a folder
    of small files paid an extra open per file (and one per thread for a split read)."""
    from concurrent.futures import ThreadPoolExecutor

    from crossearth_cli.raster import reader as reader_mod
    from crossearth_cli.raster.reader import SceneReader, StripFeed
    from crossearth_cli.raster.windows import tile_grid

    rng = np.random.default_rng(1)
    src = write_tif(tmp_path / "s.tif", rng.integers(1, 256, size=(3, 300, 600), dtype=np.uint8))
    opened = []
    real = rasterio.open
    monkeypatch.setattr(reader_mod.rasterio, "open",
                        lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    with SceneReader(src) as reader, ThreadPoolExecutor(4) as pool:
        tiles = list(StripFeed(reader, tile_grid(300, 600, 128, 96), pool, chunks=4))
    assert len(tiles) > 4
    assert len(opened) == 1
    with rasterio.open(src) as ds:  # what was read is the file
        np.testing.assert_array_equal(tiles[0][1], ds.read(window=((0, 128), (0, 128))))
