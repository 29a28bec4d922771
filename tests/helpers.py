"""Shared test helpers: GeoTIFFs written on the fly and models whose answers we know."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
UTM = CRS.from_epsg(32631)


def write_tif(
    path: Path,
    data: np.ndarray,
    crs=UTM,
    transform: Affine | None = None,
    nodata=None,
    tiled: bool = True,
    **extra,
) -> Path:
    """Write ``data`` (bands×H×W) as a GeoTIFF."""
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    profile = dict(
        driver="GTiff",
        width=w,
        height=h,
        count=count,
        dtype=data.dtype,
        crs=crs,
        transform=transform or from_origin(500000, 5800000, 0.5, 0.5),
        nodata=nodata,
        **extra,
    )
    if tiled and h >= 16 and w >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(w, 256) // 16),
                       blockysize=16 * max(1, min(h, 256) // 16))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def random_scene(h: int, w: int, seed: int = 0, bands: int = 3) -> np.ndarray:
    """Smooth-ish random uint8 imagery so classes form regions, not noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(bands, h // 8 + 2, w // 8 + 2)).astype(np.float32)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(small)[None], size=(h, w), mode="bilinear", align_corners=False
    )[0].numpy()
    noise = rng.normal(0, 12, size=(bands, h, w))
    return np.clip(t + noise, 0, 255).astype(np.uint8)


class PerPixelModel(torch.nn.Module):
    """Scores at a pixel depend only on that pixel: tiling must not change anything."""

    def __init__(self, num_classes: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(num_classes, 3, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(num_classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # positive "scores" like the real model's (sums of probabilities times sigmoids)
        return torch.nn.functional.softplus(self.conv(x)) * 10


def per_pixel_spec(num_classes: int = 4, crop: int = 64, stride: int = 40, seed: int = 0):
    from crossearth_cli.engine import ModelSpec

    names = [f"class{i}" for i in range(num_classes)]
    palette = [(40 * i % 256, 80 * i % 256, 120 * i % 256) for i in range(num_classes)]
    return ModelSpec(
        module=PerPixelModel(num_classes, seed), class_names=names, palette=palette,
        crop=crop, stride=stride, label="per-pixel test model",
    )


def tiny_model(num_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    """The tiny CrossEarth with random weights in the official layout, in eval mode."""
    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model.random_init import random_state_dict, tiny_config

    config = tiny_config(num_classes=num_classes)
    net = CrossEarth(config).eval()
    net.load_state_dict(random_state_dict(config, seed=seed))
    return net


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``crossearth ARGS`` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "crossearth_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_clean_user_error(proc, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
