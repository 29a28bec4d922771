"""Row-band accumulator: blended scores for one band of rows, never the whole scene.

Tiles arrive in row-major order. The band holds the rows covered by the current tile row
(``tile`` rows × scene width). When the first tile of the next tile row arrives, every row above
its top edge is final: those rows are turned into classes (and confidence / probabilities),
handed back as small uint8 arrays, and the band slides down.

Memory, in bytes: ``(4·C + 1) × tile × width`` on the accumulating device (C float32 scores
and a valid flag per pixel), independent of the scene height.

The band lives on the model's device; only uint8 (or float16) rows come back to the host.
On CUDA they come back asynchronously: the copies are queued behind the model's work and the
host waits for them only when it writes the rows (:meth:`FinishedRows.wait`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from crossearth_cli.raster.windows import Tile, axis_overlaps, taper_2d, window_starts

CLASS_NODATA = 255
CONFIDENCE_NODATA = 0  # max probability is >= 1/C > 0, so 0 never occurs on valid pixels
PROBABILITY_NODATA_U8 = 255  # probabilities are stored as round(p * 254)
PROBABILITY_SCALE_U8 = 254.0
_EPS = 1e-12
_EMIT_COLUMNS = 2048  # columns classified at a time on the CPU (bounds the temporaries)


def class_sum(scores: torch.Tensor) -> torch.Tensor:
    """``scores.sum(dim=0)`` (C×h×w → h×w), added class after class. ``sum`` may add in
    another order for the last columns of a row than for the others (vectorized body, scalar
    tail), so a pixel's total could differ in its last bit with the width of the window it
    was computed in: an AOI's probabilities differed from the whole scene's by 1.2e-7."""
    total = scores[0].clone()
    for c in range(1, scores.shape[0]):
        total += scores[c]
    return total


@dataclass
class FinishedRows:
    """Final rows ``y .. y + classes.shape[0]`` of the band's columns (the scene's whole width
    unless it runs in column stripes).

    On CUDA the arrays are pinned host memory that copies queued on the GPU are still filling:
    call :meth:`wait` before reading them (at once everywhere else).
    """

    y: int
    classes: np.ndarray  # (h, w) uint8, 255 = nodata; w: the band's columns
    confidence: np.ndarray | None = None  # (h, w) uint8, 0 = nodata
    probabilities: np.ndarray | None = None  # (C, h, w) uint8 (255 nodata) or float32 (NaN)
    class_counts: np.ndarray | None = None  # (C,) int64 pixels per class in these rows
    ready: object | None = None  # an event (``synchronize()``) after the copies; None: ready

    def wait(self) -> FinishedRows:
        """Block until the arrays hold the rows; returns self."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self


class RowBandAccumulator:
    """Blends tile scores into a sliding band of rows and emits finished rows in order.

    ``blend="mean"`` sums raw scores with weight 1 (mmseg's ``slide_inference``); smooth modes
    normalise each pixel's scores to probabilities first and weight them with the taper.

    No weight band is kept: the grid is a product of row and column windows, so the total
    weight at a pixel is ``Σ_rows(taper) × Σ_cols(taper)``, known in advance. Smooth blends do
    not even need it (dividing by a positive weight keeps the argmax, and probabilities are
    renormalised per pixel); ``mean`` divides by the window count as mmseg does.
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
        columns: tuple[int, int, int, int] | None = None,
    ):
        """``rows=(top, y0, y1)``: the first tile row starts at ``top``; only scene rows
        ``y0 .. y1`` are emitted (a part of a scene split across processes).
        ``columns=(x0, x1, c0, c1)``: the band spans scene columns ``x0 .. x1`` and only
        ``c0 .. c1`` are emitted (a vertical stripe of a wide scene)."""
        self.height, self.width, self.num_classes = height, width, num_classes
        self.x0, self.x1, self.c0, self.c1 = columns if columns is not None else (
            0, width, 0, width)
        self.tile, self.stride, self.blend = tile, stride, blend
        self.device = torch.device(device)
        self.want_confidence = confidence
        self.want_probabilities = probabilities
        band = min(tile, height)
        self.band_h = band
        band_w = self.x1 - self.x0
        self.scores = torch.zeros(num_classes, band, band_w, dtype=torch.float32,
                                  device=self.device)
        self.valid = torch.zeros(band, band_w, dtype=torch.bool, device=self.device)
        # band rows that received scores; the others are all zero (nodata), which lets empty
        # stretches of a sparse scene skip the band arithmetic entirely
        self._touched = np.zeros(band, dtype=bool)
        self.top, self.y0, self.y1 = rows if rows is not None else (0, 0, height)
        self._ys = tuple(window_starts(height, tile, stride))
        self._xs = tuple(window_starts(width, tile, stride))
        self._counts: tuple[torch.Tensor, torch.Tensor] | None = None
        # CUDA: rows are classified on the device and copied back without waiting (_emit_async)
        self.deferred = self.device.type == "cuda"
        self._class_ids: torch.Tensor | None = None

    def _tile_weight(self, tile: Tile) -> torch.Tensor:
        oy = axis_overlaps(self._ys, tile.row, tile.h)
        ox = axis_overlaps(self._xs, tile.col, tile.w)
        return tile_weight(tile.h, tile.w, oy, ox, self.blend, self.device)

    def _window_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows covering each scene row and each column (mean mode's divisor)."""
        if self._counts is None:
            th, tw = min(self.tile, self.height), min(self.tile, self.width)
            cy = np.zeros(self.height, np.float32)
            for y in self._ys:
                cy[y : y + th] += 1
            cx = np.zeros(self.width, np.float32)
            for x in self._xs:
                cx[x : x + tw] += 1
            self._counts = (upload(cy, self.device), upload(cx, self.device))
        return self._counts

    def add(
        self, tile: Tile, scores: torch.Tensor | None, valid: torch.Tensor | None
    ) -> list[FinishedRows]:
        """Blend one tile's scores (C×h×w, or None for a skipped all-nodata tile)."""
        finished = self._advance_to(tile.y)
        if scores is None:
            return finished
        r0 = tile.y - self.top
        rows = slice(r0, r0 + tile.h)
        cols = slice(tile.x - self.x0, tile.x - self.x0 + tile.w)
        scores = scores.to(device=self.device, dtype=torch.float32)
        if self.blend == "mean":
            self.scores[:, rows, cols] += scores
        else:
            # probabilities times the taper in one pass: s * (w / sum_c s), no C×h×w temporary
            # (a whole tile, the same in every run: torch's sum is safe here, see class_sum)
            factor = self._tile_weight(tile) / scores.sum(dim=0).clamp_min_(_EPS)
            self.scores[:, rows, cols].addcmul_(scores, factor)
        if valid is not None:
            self.valid[rows, cols] |= valid.to(self.device)
        self._touched[rows] = True
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
        if self._touched.any():
            if keep and self._touched[d:].any():
                # slide the band up by d rows in place, in chunks of at most d rows so source
                # and destination never overlap (one chunk when the overlap is below 50 %)
                for i in range(0, keep, d):
                    j = min(i + d, keep)
                    self.scores[:, i:j].copy_(self.scores[:, d + i : d + j])
                    self.valid[i:j].copy_(self.valid[d + i : d + j])
                self.scores[:, keep:].zero_()
                self.valid[keep:] = False
            else:
                self.scores.zero_()
                self.valid.fill_(False)
        self._touched = np.concatenate([self._touched[d:], np.zeros(min(d, self.band_h), bool)])
        self.top = y
        return [rows] if rows is not None else []

    def _emit(self, n: int) -> FinishedRows | None:
        """Rows ``top .. top+n`` are final; return the ones inside ``y0 .. y1``.

        On the CPU the rows are classified in chunks of columns, so the temporaries (maxima,
        int64 indices, probabilities) stay small however wide the band is.
        """
        a = min(max(self.y0 - self.top, 0), n)
        b = max(min(self.y1 - self.top, n), a)
        if a == b:
            return None
        if not self._touched[a:b].any():
            return self._empty_rows(self.top + a, b - a)
        if self.deferred:
            return self._emit_async(a, b)
        c0, c1 = self.c0 - self.x0, self.c1 - self.x0
        h, w = b - a, c1 - c0
        result = FinishedRows(y=self.top + a, classes=np.empty((h, w), np.uint8),
                              class_counts=np.zeros(self.num_classes, np.int64))
        if self.want_confidence:
            result.confidence = np.empty((h, w), np.uint8)
        if self.want_probabilities:
            dtype = np.uint8 if self.want_probabilities == "uint8" else np.float32
            result.probabilities = np.empty((self.num_classes, h, w), dtype)
        step = w if self.device.type != "cpu" else _EMIT_COLUMNS
        for x in range(c0, c1, step):
            self._classify_into(a, b, slice(x, min(x + step, c1)), result, x - c0)
        return result

    def _emit_async(self, a: int, b: int) -> FinishedRows:
        """Band rows ``a .. b`` classified on the device, their copies to the host only started.

        Reading a result back (``.cpu()``) would make the host wait for the model's whole queued
        forward and then refill the GPU's queue from empty. Here the copies go into pinned
        memory behind that work, and the host waits (``FinishedRows.wait``) when it writes the
        rows. The band slide and blending that follow are queued on the same stream, so these
        kernels read the band before it changes.
        """
        classes, conf, p = self._classify(a, b, slice(self.c0 - self.x0, self.c1 - self.x0))
        if self._class_ids is None:
            self._class_ids = torch.arange(self.num_classes, dtype=torch.uint8,
                                           device=self.device).view(-1, 1, 1)
        # (C,) pixels per class by comparison (C×h×W bool, a fraction of the band): on CUDA
        # torch.bincount reads the maximum back to size its output, which waits for the GPU
        counts = (classes == self._class_ids).sum(dim=(1, 2))
        result = FinishedRows(y=self.top + a, classes=_start_copy(classes),
                              confidence=_start_copy(conf), probabilities=_start_copy(p),
                              class_counts=_start_copy(counts))
        result.ready = _record_ready(self.device)
        return result

    def _classify(
        self, a: int, b: int, cols: slice
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Band rows ``a .. b``, columns ``cols`` → classes (h×w uint8), confidence (h×w uint8)
        and probabilities (C×h×w) as asked, on the band's device."""
        valid = self.valid[a:b, cols]
        if self.blend == "mean":  # mmseg: average of raw scores, then argmax
            cy, cx = self._window_counts()
            count = torch.outer(cy[self.top + a : self.top + b],
                                cx[self.x0 + cols.start : self.x0 + cols.stop])
            scores = self.scores[:, a:b, cols] / count
        else:  # weighted sums of probabilities: their argmax is the blended argmax
            scores = self.scores[:, a:b, cols]
        top, classes = scores.max(dim=0)  # max(dim) is several times faster than argmax(dim)
        classes = classes.to(torch.uint8)
        classes.masked_fill_(~valid, CLASS_NODATA)
        conf = p = None
        if not (self.want_confidence or self.want_probabilities):
            return classes, conf, p
        total = class_sum(scores).clamp_min_(_EPS)
        if self.want_confidence:
            conf = (top / total).mul_(255.0).round_().clamp_(1, 255).to(torch.uint8)
            conf.masked_fill_(~valid, CONFIDENCE_NODATA)
        if self.want_probabilities == "uint8":
            p = (scores / total).mul_(PROBABILITY_SCALE_U8).round_().to(torch.uint8)
            p.masked_fill_(~valid, PROBABILITY_NODATA_U8)
        elif self.want_probabilities in ("float16", "float32"):  # the writer stores the width
            p = (scores / total).masked_fill_(~valid, float("nan"))
        return classes, conf, p

    def _classify_into(self, a: int, b: int, cols: slice, out: FinishedRows, at: int) -> None:
        """Band rows ``a .. b``, columns ``cols`` → ``out`` from column ``at``, synchronously."""
        dst = slice(at, at + cols.stop - cols.start)
        classes, conf, p = self._classify(a, b, cols)
        # nodata lands in bin 255: no boolean indexing (a copy) needed to leave it out
        out.class_counts += torch.bincount(
            classes.flatten(), minlength=256)[: self.num_classes].cpu().numpy()
        out.classes[:, dst] = classes.cpu().numpy()
        if conf is not None:
            out.confidence[:, dst] = conf.cpu().numpy()
        if p is not None:
            out.probabilities[:, :, dst] = p.cpu().numpy()

    def _empty_rows(self, y: int, h: int) -> FinishedRows:
        """Rows no tile with data reached: all nodata, without touching the band.

        The arrays are read-only broadcast views of one value (no memory): the writer sees the
        zero strides and leaves those blocks unwritten (sparse output, read back as nodata).
        """
        shape = (h, self.c1 - self.c0)
        result = FinishedRows(
            y=y,
            classes=np.broadcast_to(np.uint8(CLASS_NODATA), shape),
            class_counts=np.zeros(self.num_classes, dtype=np.int64),
        )
        if self.want_confidence:
            result.confidence = np.broadcast_to(np.uint8(CONFIDENCE_NODATA), shape)
        if self.want_probabilities == "uint8":
            result.probabilities = np.broadcast_to(
                np.uint8(PROBABILITY_NODATA_U8), (self.num_classes, *shape))
        elif self.want_probabilities in ("float16", "float32"):
            result.probabilities = np.broadcast_to(
                np.float32(np.nan), (self.num_classes, *shape))
        return result


@functools.lru_cache(maxsize=32)
def tile_weight(h: int, w: int, oy: tuple, ox: tuple, blend: str,
                device: torch.device) -> torch.Tensor:
    """The h×w taper of a tile with overlaps ``oy`` (top, bottom) and ``ox`` (left, right)
    on ``device``. Tiles with the same overlaps share one map: a handful per scene, and one for
    a whole folder of same-sized files, so it is made and uploaded once, not per file. Read
    only: callers must not write into it."""
    return upload(taper_2d(h, w, oy, ox, blend), device)


def upload(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (an array or a list) as a tensor on ``device``, without making the host
    wait for the GPU.

    A copy to CUDA from ordinary (pageable) host memory first waits for everything queued on
    the stream, which drains the GPU's queue of model work; from pinned memory it is queued
    behind that work instead. torch's caching host allocator reuses the pinned block only
    once the copy has run."""
    t = torch.as_tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _start_copy(t: torch.Tensor | None) -> np.ndarray | None:
    """Queue a copy of ``t`` into new host memory (pinned for a CUDA tensor, so the copy runs
    asynchronously); the array holds the values once the stream has passed the copy.

    torch's caching host allocator hands a pinned block out again only after the copies
    recorded on it are done, so dropping an array whose copy is still queued is safe."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=True)
    return host.numpy()  # a view: the array keeps the tensor (and its block) alive


def _record_ready(device: torch.device):
    """An event after everything queued so far on the device's current stream (None where
    copies are synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
