"""Synthetic scenes for the benchmarks: tiled GeoTIFFs that look like imagery, not noise.

Smooth colour fields (bilinear upsampling of a coarse random grid, so areas compress and
classify like real land cover) plus pixel texture, written strip by strip so even a 16k² scene
needs little memory to create. Also the small models the benchmarks use.
"""

from __future__ import annotations

import atexit
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

CELL = 48  # pixels per coarse grid cell
TFLOP_PER_TILE = {512: 0.89, 1024: 4.8}  # ViT-L CrossEarth, reference §3.5 (2 × MACs)


def work_dir(prefix: str, keep: Path | None = None) -> Path:
    """The folder a benchmark writes its scenes and outputs in.

    A folder the user named (``--workdir``) is kept for inspection; otherwise a temporary one
    is made and removed when the process exits, after a failure too: a 16k² scene is
    hundreds of MB.
    """
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return keep
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def _lerp_axis(grid: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    i0 = np.floor(coords).astype(int)
    f = (coords - i0).astype(np.float32)
    a = np.take(grid, i0, axis=axis)
    b = np.take(grid, i0 + 1, axis=axis)
    shape = [1] * grid.ndim
    shape[axis] = len(coords)
    f = f.reshape(shape)
    return a * (1 - f) + b * f


def write_scene(path: Path, size: int, bands: int = 3, seed: int = 0, block: int = 512,
                compress: str = "deflate", width: int | None = None,
                dtype: str = "uint8") -> Path:
    """A ``size``×``width`` scene (UTM, 0.5 m), tiled ``block`` and compressed: uint8, or
    ``dtype="uint16"`` with the same picture ×40 (reflectance-like values up to ~10,000)."""
    width = width or size
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(20, 235, size=(bands, size // CELL + 2, width // CELL + 2))
    coarse = coarse.astype(np.float32)
    profile = dict(driver="GTiff", width=width, height=size, count=bands, dtype=dtype,
                   crs="EPSG:32631", transform=from_origin(500000, 5800000, 0.5, 0.5),
                   tiled=True, blockxsize=block, blockysize=block, compress=compress,
                   num_threads="ALL_CPUS")
    if compress in ("deflate", "zstd", "lzw"):
        profile["predictor"] = 2
    xs = np.arange(width) / CELL
    cols = _lerp_axis(coarse, xs, axis=2)  # bands × coarse rows × width
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, block):
            h = min(block, size - y0)
            strip = _lerp_axis(cols, np.arange(y0, y0 + h) / CELL, axis=1)
            strip += rng.integers(-12, 13, size=strip.shape, dtype=np.int16)
            values = np.clip(strip, 0, 255).astype(np.uint8)
            if dtype != "uint8":
                values = values.astype(dtype) * 40
            ds.write(values, window=Window(0, y0, width, h))
    return path


def write_tiles(folder: Path, files: int, size: int) -> Path:
    """A folder of ``files`` small scenes of ``size``² (different seeds), like a dataset of
    tiles (Potsdam's evaluation crops are 512²)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        write_scene(folder / f"tile_{i:03d}.tif", size, seed=i, block=256)
    return folder


class ZeroCostHead(torch.nn.Module):
    """Per-pixel scores with the head's output shape (B×C×H×W) at almost no cost.

    Channel c is the absolute value of band c mod 3 (non-negative scores, like the real
    head's): the bands repeated by ``torch.cat`` (a copy) and one in-place abs, so what is left
    to time is the pipeline around the model. Classes still vary across the scene (whichever
    normalised band is largest in magnitude). (It used ``index_select``, which gave the same
    scores at twice the cost on the CPU: 32 against 17 ms for 8 tiles of 512².)
    """

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole, rest = divmod(self.num_classes, x.shape[1])
        return torch.cat([x] * whole + [x[:, :rest]], dim=1).abs_()


def random_model(tiny: bool, size: int, device: str) -> torch.nn.Module:
    """A random-weight CrossEarth for ``size``² tiles, in eval mode: the tiny test model, or
    ViT-L (the real architecture: weights do not change the work)."""
    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model.random_init import random_state_dict, tiny_config, vit_large_config

    config = tiny_config(img_size=size) if tiny else vit_large_config(6, img_size=size)
    with torch.device("meta"):
        net = CrossEarth(config)
    net.load_state_dict(random_state_dict(config, seed=0), assign=True)
    return net.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """What one n×n×n matmul in ``dtype`` reaches on ``device`` (TFLOP/s, best call): the
    measured compute limit beside which the model's own rate is quoted."""
    import time

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def tiny_checkpoint(path: Path, num_classes: int = 6) -> Path:
    from crossearth_cli.model.random_init import tiny_config, write_random_checkpoint

    if not path.exists():
        write_random_checkpoint(path, tiny_config(num_classes=num_classes), seed=0,
                                fmt="mmengine")
    return path


def class_agreement(a: Path, b: Path) -> float:
    """Share of pixels on which two class rasters agree (read back with rasterio)."""
    with rasterio.open(a) as da, rasterio.open(b) as db:
        return float(np.mean(da.read(1) == db.read(1)))


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM).

    Not ``ru_maxrss``: a child started with vfork + exec (Python's ``subprocess`` on Linux)
    inherits the parent's peak there, so a benchmark process that had written a 16k² scene
    would pass its own peak on to the run it measures next."""
    try:
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import os
    import platform

    gpu = ""
    if torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name(0)}"
    return (f"{platform.machine()}, {os.cpu_count()} CPU threads, Python "
            f"{platform.python_version()}, torch {torch.__version__}{gpu}")


def profiled(fn, top: int = 30) -> dict:
    """``fn()`` under cProfile (the calling thread only: the one that launches GPU work)."""
    prof = cProfile.Profile()
    row = prof.runcall(fn)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    row["profile"] = buf.getvalue()[-12000:]
    return row
