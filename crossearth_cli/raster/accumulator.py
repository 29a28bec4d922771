"""Row-band accumulator: blended scores for one band of rows, never the whole scene.

Tiles arrive in row-major order. The band holds the rows covered by the current tile row
(``tile`` rows × scene width). When the first tile of the next tile row arrives, every row above
its top edge is final: those rows are turned into classes (and confidence / probabilities),
handed back as small uint8 arrays, and the band slides down.

Memory, in bytes: ``(C + 2) × 4 × tile × width`` on the accumulating device (scores, weights,
valid mask), independent of the scene height.

The band lives on the model's device; only uint8 (or float16) rows come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crossearth_cli.raster.windows import Tile, axis_overlaps, taper, window_starts

CLASS_NODATA = 255
CONFIDENCE_NODATA = 0  # max probability is >= 1/C > 0, so 0 never occurs on valid pixels
PROBABILITY_NODATA_U8 = 255  # probabilities are stored as round(p * 254)
PROBABILITY_SCALE_U8 = 254.0
_EPS = 1e-12


@dataclass
class FinishedRows:
    """Final rows ``y .. y + classes.shape[0]`` of the scene, full width."""

    y: int
    classes: np.ndarray  # (h, W) uint8, 255 = nodata
    confidence: np.ndarray | None = None  # (h, W) uint8, 0 = nodata
    probabilities: np.ndarray | None = None  # (C, h, W) uint8 (255 nodata) or float32 (NaN)
    class_counts: np.ndarray | None = None  # (C,) int64 pixels per class in these rows


class RowBandAccumulator:
    """Blends tile scores into a sliding band of rows and emits finished rows in order.

    ``blend="mean"`` sums raw scores with weight 1 (mmseg's ``slide_inference``); smooth modes
    normalise each pixel's scores to probabilities first and weight them with the taper.
    """

    def __init__(
        self,
        height: int,
        width: int,
        num_classes: int,
        tile: int,
        stride: int,
        blend: str,
        device: torch.device | str = "cpu",
        confidence: bool = False,
        probabilities: str | None = None,  # None | "uint8" | "float16" | "float32"
        rows: tuple[int, int, int] | None = None,
    ):
        """``rows=(top, y0, y1)``: the first tile row starts at ``top``; only scene rows
        ``y0 .. y1`` are emitted (a part of a scene split across processes)."""
        self.height, self.width, self.num_classes = height, width, num_classes
        self.tile, self.stride, self.blend = tile, stride, blend
        self.device = torch.device(device)
        self.want_confidence = confidence
        self.want_probabilities = probabilities
        band = min(tile, height)
        self.band_h = band
        self.scores = torch.zeros(num_classes, band, width, dtype=torch.float32, device=self.device)
        self.weight = torch.zeros(band, width, dtype=torch.float32, device=self.device)
        self.valid = torch.zeros(band, width, dtype=torch.bool, device=self.device)
        self.top, self.y0, self.y1 = rows if rows is not None else (0, 0, height)
        self._ys = tuple(window_starts(height, tile, stride))
        self._xs = tuple(window_starts(width, tile, stride))
        self._weights: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def band_bytes(width: int, tile: int, num_classes: int) -> int:
        return (num_classes + 2) * 4 * tile * width

    def _tile_weight(self, tile: Tile) -> torch.Tensor:
        # Tiles with the same overlaps on each side share one weight map (a handful per scene).
        oy = axis_overlaps(self._ys, tile.row, tile.h)
        ox = axis_overlaps(self._xs, tile.col, tile.w)
        w = self._weights.get((oy, ox))
        if w is None:
            wy = taper(tile.h, *oy, self.blend)
            wx = taper(tile.w, *ox, self.blend)
            w = torch.from_numpy(np.outer(wy, wx).astype(np.float32)).to(self.device)
            self._weights[(oy, ox)] = w
        return w

    def add(
        self, tile: Tile, scores: torch.Tensor | None, valid: torch.Tensor | None
    ) -> list[FinishedRows]:
        """Blend one tile's scores (C×h×w, or None for a skipped all-nodata tile)."""
        finished = self._advance_to(tile.y)
        if scores is None:
            return finished
        r0 = tile.y - self.top
        rows = slice(r0, r0 + tile.h)
        cols = slice(tile.x, tile.x + tile.w)
        scores = scores.to(device=self.device, dtype=torch.float32)
        if self.blend == "mean":
            self.scores[:, rows, cols] += scores
            self.weight[rows, cols] += 1.0
        else:
            # probabilities times the taper in one pass: s * (w / sum_c s), no C×h×w temporary
            w = self._tile_weight(tile)
            factor = w / scores.sum(dim=0).clamp_min_(_EPS)
            self.scores[:, rows, cols].addcmul_(scores, factor)
            self.weight[rows, cols] += w
        if valid is not None:
            self.valid[rows, cols] |= valid.to(self.device)
        return finished

    def finish(self) -> list[FinishedRows]:
        """Emit every remaining row of the part."""
        out = []
        if self.top < self.y1:
            out.append(self._emit(self.y1 - self.top))
            self.top = self.y1
        return [r for r in out if r is not None]

    def _advance_to(self, y: int) -> list[FinishedRows]:
        if y <= self.top:
            return []
        d = y - self.top
        if d > self.band_h:
            raise ValueError("tiles skipped rows: stride larger than tile")
        rows = self._emit(d)
        keep = max(self.band_h - d, 0)
        # slide the band up by d rows and clear the freed rows
        if keep:
            self.scores[:, :keep] = self.scores[:, d:].clone()
            self.weight[:keep] = self.weight[d:].clone()
            self.valid[:keep] = self.valid[d:].clone()
        self.scores[:, keep:].zero_()
        self.weight[keep:].zero_()
        self.valid[keep:] = False
        self.top = y
        return [rows] if rows is not None else []

    def _emit(self, n: int) -> FinishedRows | None:
        """Rows ``top .. top+n`` are final; return the ones inside ``y0 .. y1``."""
        a = min(max(self.y0 - self.top, 0), n)
        b = max(min(self.y1 - self.top, n), a)
        if a == b:
            return None
        weight = self.weight[a:b]
        valid = self.valid[a:b] & (weight > 0)
        if self.blend == "mean":  # mmseg: average of raw scores, then argmax
            scores = self.scores[:, a:b] / weight.clamp_min(_EPS)
        else:  # weighted sums of probabilities; dividing by the weight keeps the argmax
            scores = self.scores[:, a:b]
        top, classes = scores.max(dim=0)  # max(dim) is several times faster than argmax(dim)
        classes = classes.to(torch.uint8)
        classes[~valid] = CLASS_NODATA
        counts = torch.bincount(classes[valid].flatten().long(), minlength=self.num_classes)
        result = FinishedRows(
            y=self.top + a,
            classes=classes.cpu().numpy(),
            class_counts=counts[: self.num_classes].cpu().numpy(),
        )
        if self.want_confidence or self.want_probabilities:
            total = scores.sum(dim=0).clamp_min_(_EPS)
            if self.want_confidence:
                conf = (top / total).mul_(255.0).round_().clamp_(1, 255).to(torch.uint8)
                conf[~valid] = CONFIDENCE_NODATA
                result.confidence = conf.cpu().numpy()
            if self.want_probabilities:
                scores = scores / total
            if self.want_probabilities == "uint8":
                p = (scores * PROBABILITY_SCALE_U8).round_().to(torch.uint8)
                p[:, ~valid] = PROBABILITY_NODATA_U8
                result.probabilities = p.cpu().numpy()
            elif self.want_probabilities in ("float16", "float32"):  # writer stores the width
                p = scores
                p[:, ~valid] = float("nan")
                result.probabilities = p.cpu().numpy()
        return result
