"""Peak memory depends on tile height and scene width, never on scene height."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
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
