"""``--range shared``: one stretch to 0–255 for every input of a run.

``--range auto`` stretches each scene by its own 2–98 % percentiles. For the tiles of one
mosaic that is a per-tile stretch again, one level up: a tile of mostly water and its
neighbour of mostly roofs get different stretches, so the same field changes brightness, and
sometimes class, at the tile edge. ``shared`` takes the percentiles of all inputs' values
together, each input weighing as many valid pixels as it holds.

Each input is sampled as ``auto`` samples a scene (overviews or a sparse grid of windows) and
summarised by evenly spaced quantiles of its values, weighted by its valid pixels; the pooled
summary is re-quantised when it grows, so memory stays bounded however many inputs there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from crossearth_cli.raster.reader import (
    PERCENTILES,
    BandScaling,
    SceneReader,
    SharedScaling,
    percentile_scaling,
    stretch,
)

POINTS_PER_INPUT = 4096  # quantiles that stand for one input's values
POOL_LIMIT = 1 << 20  # pooled points before they are re-quantised ...
POOL_KEPT = 1 << 16  # ... to this many


class WeightedQuantiles:
    """Values with weights, whose weighted percentiles approximate those of the pooled data."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.size = 0

    def add(self, values: np.ndarray, weight: float) -> None:
        """Add a sample of values that stands for ``weight`` pixels in all."""
        if values.size == 0 or weight <= 0:
            return
        points = _quantile_points(values, POINTS_PER_INPUT)
        self.values.append(points)
        self.weights.append(np.full(points.size, weight / points.size))
        self.size += points.size
        if self.size > POOL_LIMIT:
            self._requantise()

    def _requantise(self) -> None:
        values, cdf, total = self._cdf()
        points = np.interp((np.arange(POOL_KEPT) + 0.5) / POOL_KEPT, cdf, values)
        self.values, self.weights = [points], [np.full(POOL_KEPT, total / POOL_KEPT)]
        self.size = POOL_KEPT

    def _cdf(self) -> tuple[np.ndarray, np.ndarray, float]:
        values = np.concatenate(self.values)
        weights = np.concatenate(self.weights)
        order = np.argsort(values, kind="stable")
        values, weights = values[order], weights[order]
        total = float(weights.sum())
        # each point at the middle of its own weight, as np.percentile places equal weights
        return values, (np.cumsum(weights) - weights / 2) / total, total

    def percentiles(self, qs) -> list[float]:
        values, cdf, _ = self._cdf()
        return [float(v) for v in np.interp(np.asarray(qs) / 100.0, cdf, values)]

    def percentile(self, q: float) -> float:
        return self.percentiles([q])[0]

    def scaling(self) -> BandScaling:
        if not self.size:
            return BandScaling(0.0, 255.0, sampled=False)
        return stretch(*self.percentiles(PERCENTILES))


def _quantile_points(values: np.ndarray, n: int) -> np.ndarray:
    """``n`` evenly spaced quantiles of ``values`` (all of them if there are fewer)."""
    if values.size <= n:
        return values
    return np.quantile(values, (np.arange(n) + 0.5) / n)


def shared_scaling(
    paths: Iterable[Path],
    bands: list[int] | None,
    band_order: str,
    skipped: Callable[[Path, str], None] | None = None,
) -> SharedScaling:
    """The 2–98 % stretch of all ``paths`` together, per model channel.

    Only inputs the default would stretch are pooled (8-bit and paletted ones are used as they
    are); inputs that cannot be read are left out too, and ``skipped(path, reason)`` hears of
    them (they fail later, on their own). One input pooled gives its own ``auto`` stretch.
    """
    pools = [WeightedQuantiles() for _ in range(3)]
    files, first = 0, None
    for path in paths:
        try:
            with SceneReader(path, bands=bands, value_range="none",
                             band_order=band_order) as reader:
                if not reader.takes_shared_range:
                    continue
                sampled = reader.sample_values()
                area = reader.height * reader.width
        except Exception as exc:  # noqa: BLE001 - this file fails again, on its own, later
            if skipped is not None:
                skipped(Path(path), str(exc))
            continue
        files += 1
        first = sampled if files == 1 else None  # kept whole while it is the only one
        for pool, (values, read) in zip(pools, sampled):
            pool.add(values, area * values.size / max(read, 1))  # its valid pixels
    if first is not None:  # exactly what auto takes of it, not its summary
        return SharedScaling(tuple(percentile_scaling(v) for v, _ in first), files)
    return SharedScaling(tuple(pool.scaling() for pool in pools), files)
