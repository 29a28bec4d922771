"""Windowed reads of the input scene: band selection, per-scene scaling, nodata masks.

Every tile comes back as float32 on the 0–255 scale the model was trained on, plus a boolean
mask of valid pixels. A pixel is invalid when every selected band holds the nodata value,
when a mask (per-dataset, per-band, or an alpha band) marks it, or when any band is not
finite (NaN, inf).

Scaling is decided once per scene, never per tile (a per-tile stretch makes seams): 8-bit data
is used as is, anything else is stretched linearly from robust percentiles of a decimated
read (overviews when the file has them, otherwise a sparse grid of small windows).

rasterio dataset handles are not thread-safe, so each reader thread opens its own.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from crossearth_cli.errors import ConfigError, InputError
from crossearth_cli.raster.windows import Tile

PERCENTILES = (2.0, 98.0)
_SAMPLE_GRID = 12  # windows per axis when the file has no overviews
_SAMPLE_WINDOW = 128  # pixels per side of each sample window
_SAMPLE_TARGET = 1024  # longest side of a decimated read through overviews


@dataclass(frozen=True)
class Scaling:
    """``x → clip((x - low) × factor, 0, 255)`` per band; ``low`` None: no stretch."""

    low: np.ndarray | None
    factor: np.ndarray | None
    clip: bool


@dataclass(frozen=True)
class BandScaling:
    """Linear map of one band's values to 0–255: ``(v - low) / (high - low) * 255``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ConfigError(f"range {self.low},{self.high}: the maximum must exceed the minimum")


def parse_range(text: str | None, n_bands: int) -> list[BandScaling] | str | None:
    """``auto`` | ``none`` | ``MIN,MAX`` (all bands) | ``MIN,MAX,MIN,MAX,...`` (per band)."""
    if text is None or text.strip().lower() in ("", "default"):
        return None
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower()
    try:
        values = [float(v) for v in text.replace(";", ",").replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(
            f"--range {text!r} is not 'auto', 'none' or numbers",
            hint="use e.g. --range 0,3000 or --range auto",
        ) from None
    if len(values) == 2:
        return [BandScaling(values[0], values[1])] * n_bands
    if len(values) == 2 * n_bands:
        return [BandScaling(values[2 * i], values[2 * i + 1]) for i in range(n_bands)]
    raise ConfigError(
        f"--range {text!r} has {len(values)} numbers; give 2 (all bands) or {2 * n_bands} "
        f"(MIN,MAX for each of the {n_bands} bands)"
    )


def parse_bands(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        bands = [int(b) for b in text.split(",")]
    except ValueError:
        raise ConfigError(f"--bands {text!r} must be 1-based band numbers like 1,2,3") from None
    if len(bands) != 3:
        raise ConfigError(f"--bands {text!r} must name 3 bands (the model takes 3 channels)")
    return bands


def open_raster(path: str | Path) -> rasterio.DatasetReader:
    """Open ``path`` for reading, turning every failure into one clear line."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", path=p, hint="check the path")
    if p.is_dir():
        raise InputError("is a folder, not a raster", path=p)
    if p.stat().st_size == 0:
        raise InputError("is an empty file (0 bytes), not a raster", path=p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(p)
    except RasterioIOError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise InputError(
            f"not a readable raster ({first})",
            path=p,
            hint="is it a GeoTIFF? convert it with gdal_translate",
        ) from exc
    except MemoryError as exc:
        raise InputError("raster header asks for more memory than exists", path=p) from exc


def mask_kind(flags) -> str:
    """How one band marks invalid pixels: "none", "nodata" (a value) or "mask".

    A nodata *value* marks a pixel invalid only where every such band holds it, so a real 0 in
    one band survives ``nodata=0``. Masks and alpha bands are explicit: any masked band counts.
    """
    if MaskFlags.all_valid in flags:
        return "none"
    if MaskFlags.nodata in flags:
        return "nodata"
    return "mask"  # per-dataset mask, alpha band, or a per-band mask


def _equals_nodata(band: np.ndarray, nodata: float | None) -> np.ndarray:
    if nodata is None:
        return np.zeros(band.shape, dtype=bool)
    if np.isnan(nodata):
        return np.isnan(band)
    return band == np.asarray(nodata).astype(band.dtype)


def check_readable(src, bands: list[int] | None = None) -> None:
    """Read the last block so a truncated file fails now, before any output exists."""
    h, w = src.block_shapes[0] if src.block_shapes else (1, src.width)
    window = Window(max(src.width - w, 0), max(src.height - h, 0), min(w, src.width),
                    min(h, src.height))
    try:
        src.read(bands or 1, window=window)
    except RasterioIOError as exc:
        raise InputError(
            "cannot be read to the end: the file is truncated or corrupt",
            path=src.name,
            hint="copy or download it again",
        ) from exc


def probe_input(path: str | Path) -> None:
    """Fail fast (before loading a model) on inputs that cannot be segmented at all."""
    with open_raster(path) as src:
        check_readable(src)


def _colorinterp_bands(src, interp: ColorInterp) -> int | None:
    for i, ci in enumerate(src.colorinterp, start=1):
        if ci == interp:
            return i
    return None


def _nir_band(src) -> int | None:
    for i, desc in enumerate(src.descriptions, start=1):
        if desc and any(k in desc.lower() for k in ("nir", "near-infrared", "near infrared")):
            return i
    return None


def default_bands(src, order: str) -> tuple[list[int], str | None]:
    """Bands for a model expecting ``order`` ("RGB" or "IRRG") and a note when guessed."""
    colours = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    rgb = [_colorinterp_bands(src, c) for c in colours]
    has_rgb = all(b is not None for b in rgb)
    if order == "IRRG":
        nir = _nir_band(src)
        if nir is None and has_rgb and src.count >= 4:
            extra = [
                i
                for i, ci in enumerate(src.colorinterp, start=1)
                if i not in rgb and ci != ColorInterp.alpha
            ]
            nir = extra[0] if extra else None
        if nir is not None and has_rgb:
            return [nir, rgb[0], rgb[1]], None
        if src.count >= 3:
            return [1, 2, 3], (
                "the model expects near-infrared, red, green; bands 1,2,3 are assumed to be "
                "in that order (pass --bands to choose)"
            )
    else:
        if has_rgb:
            return list(rgb), None
        if src.count >= 3:
            return [1, 2, 3], "bands 1,2,3 are assumed to be red, green, blue (pass --bands)"
    raise InputError(
        f"has {src.count} band(s); the model needs 3",
        path=src.name,
        hint="pass --bands, e.g. --bands 1,1,1 for a single band",
    )


class SceneReader:
    """Reads tiles of one scene; safe to call from several threads at once."""

    def __init__(
        self,
        path: str | Path,
        bands: list[int] | None = None,
        value_range: str | list[BandScaling] | None = None,
        band_order: str = "RGB",
    ):
        self.path = Path(path)
        src = open_raster(self.path)
        self._handles: list = [src]
        self._local = threading.local()
        self._local.src = src
        self._lock = threading.Lock()
        try:
            self._inspect(src, bands, value_range, band_order)
        except Exception:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------

    def _inspect(self, src, bands, value_range, band_order) -> None:
        self.height, self.width, self.count = src.height, src.width, src.count
        dtypes = set(src.dtypes)
        if any(np.dtype(d).kind == "c" for d in dtypes):
            raise InputError(
                f"has complex pixels ({', '.join(sorted(dtypes))}); the model needs real values",
                path=self.path,
                hint="convert to amplitude first, e.g. with gdal_calc or gdal_translate",
            )
        self.notes: list[str] = []
        if bands is None:
            bands, note = default_bands(src, band_order)
            if note:
                self.notes.append(note)
        for b in bands:
            if not 1 <= b <= src.count:
                raise InputError(
                    f"band {b} is out of range: the raster has {src.count} band(s)",
                    path=self.path,
                    hint=f"pass --bands with numbers from 1 to {src.count}",
                )
        self.bands = list(bands)
        self.dtype = np.result_type(*[np.dtype(src.dtypes[b - 1]) for b in self.bands])
        self._mask_kinds = [mask_kind(src.mask_flag_enums[b - 1]) for b in self.bands]
        self._nodata = [src.nodatavals[b - 1] for b in self.bands]
        self.crs = src.crs
        self.transform = src.transform
        gcps, gcp_crs = src.gcps
        self.gcps = (gcps, gcp_crs) if gcps else None
        self.profile = src.profile
        if src.crs is None and self.gcps is None:
            self.notes.append("the raster has no CRS: the outputs will have none either")
        self.scaling = self._resolve_scaling(src, value_range)
        self._check_readable(src)

    def _resolve_scaling(self, src, value_range) -> list[BandScaling] | None:
        if isinstance(value_range, list):
            if len(value_range) != len(self.bands):
                raise ConfigError(f"--range gives {len(value_range)} bands, expected 3")
            return value_range
        all_uint8 = all(src.dtypes[b - 1] == "uint8" for b in self.bands)
        if value_range == "none" or (value_range is None and all_uint8):
            return None
        scaling = scene_percentiles(src, self.bands)
        self.notes.append(
            "scaled to 0-255 from the scene's "
            f"{PERCENTILES[0]:g}-{PERCENTILES[1]:g} percentiles: "
            + "; ".join(f"band {b}: {s.low:.6g}..{s.high:.6g}" for b, s in zip(self.bands, scaling))
        )
        return scaling

    def _check_readable(self, src) -> None:
        check_readable(src, self.bands)

    # -- reading ------------------------------------------------------------------------

    def _src(self):
        src = getattr(self._local, "src", None)
        if src is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(self.path)
            with self._lock:
                self._handles.append(src)
            self._local.src = src
        return src

    def read_tile(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """(3×h×w float32 on 0–255, h×w bool valid) for ``tile``."""
        data, valid = self.read_raw(tile.y, tile.x, tile.h, tile.w)
        return self.to_model_scale(data, valid), valid

    def read_window(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        data, valid = self.read_raw(y, x, h, w)
        return self.to_model_scale(data, valid), valid

    def read_raw(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(3×h×w in the file's dtype, h×w bool valid): one read, masks derived from it."""
        src = self._src()
        window = Window(x, y, w, h)
        try:
            data = src.read(self.bands, window=window, out_dtype=self.dtype)
            valid = np.ones((h, w), dtype=bool)
            by_value = [i for i, k in enumerate(self._mask_kinds) if k == "nodata"]
            if by_value:  # nodata only where every such band holds its nodata value
                hit = np.ones((h, w), dtype=bool)
                for i in by_value:
                    hit &= _equals_nodata(data[i], self._nodata[i])
                valid &= ~hit
            for i, kind in enumerate(self._mask_kinds):
                if kind == "mask":  # per-dataset / per-band mask or alpha: GDAL reads it
                    valid &= src.read_masks(self.bands[i], window=window) > 0
        except RasterioIOError as exc:
            raise InputError(
                f"read failed at rows {y}-{y + h}, columns {x}-{x + w}: the file is truncated "
                "or corrupt",
                path=self.path,
                hint="copy or download it again",
            ) from exc
        if self.dtype.kind == "f":
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

    def to_model_scale(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw pixels → float32 on the 0–255 scale, invalid pixels 0 (numpy, for one tile)."""
        out = data.astype(np.float32)
        out[:, ~valid] = 0.0
        low, factor = self.scale_params()
        if low is not None:
            out -= low[:, None, None]
            out *= factor[:, None, None]
        if low is not None or self.dtype != np.uint8:
            np.clip(out, 0.0, 255.0, out=out)
        return out

    def scale_params(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-band (low, 255 / (high - low)), or (None, None) when values are used as is."""
        s = self.model_scaling()
        return s.low, s.factor

    def model_scaling(self) -> Scaling:
        """How raw values become the model's 0–255, as the engine applies it to batches."""
        if self.scaling is None:
            return Scaling(None, None, clip=self.dtype != np.uint8)
        low = np.array([s.low for s in self.scaling], dtype=np.float32)
        factor = np.array([255.0 / (s.high - s.low) for s in self.scaling], dtype=np.float32)
        return Scaling(low, factor, clip=True)

    def close(self) -> None:
        with self._lock:
            for h in self._handles:
                try:
                    h.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._handles.clear()
        self._local = threading.local()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sample_windows(height: int, width: int) -> list[Window]:
    n_y = min(_SAMPLE_GRID, max(1, height // _SAMPLE_WINDOW))
    n_x = min(_SAMPLE_GRID, max(1, width // _SAMPLE_WINDOW))
    wh, ww = min(_SAMPLE_WINDOW, height), min(_SAMPLE_WINDOW, width)
    ys = np.linspace(0, height - wh, n_y).astype(int)
    xs = np.linspace(0, width - ww, n_x).astype(int)
    return [Window(int(x), int(y), ww, wh) for y in ys for x in xs]


def scene_percentiles(src, bands: list[int]) -> list[BandScaling]:
    """Robust per-band 2–98 % percentiles from overviews or a sparse grid of windows."""
    has_overviews = bool(src.overviews(bands[0]))
    if has_overviews or src.width * src.height <= _SAMPLE_TARGET**2:
        scale = max(src.width, src.height) / _SAMPLE_TARGET
        shape = (
            len(bands),
            max(1, int(round(src.height / max(scale, 1)))),
            max(1, int(round(src.width / max(scale, 1)))),
        )
        chunks = [src.read(bands, out_shape=shape, masked=True, out_dtype="float64")]
    else:
        chunks = [
            src.read(bands, window=w, masked=True, out_dtype="float64")
            for w in _sample_windows(src.height, src.width)
        ]
    result = []
    for i in range(len(bands)):
        values = np.concatenate([np.ma.compressed(c[i]) for c in chunks])
        values = values[np.isfinite(values)]
        if values.size == 0:
            lo, hi = 0.0, 255.0
        else:
            lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
        if not hi > lo:
            hi = lo + 1.0
        result.append(BandScaling(lo, hi))
    return result


def cpu_io_threads() -> int:
    """Reader threads: two are enough to hide reads behind compute on most disks."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class StripFeed:
    """Feeds a scene's tiles row by row from full-width strips of rows, each pixel read once.

    Tile rows overlap vertically and tiles overlap horizontally; reading tile windows would
    decompress most pixels 2-3 times. Instead the feed keeps a strip of ``tile`` rows in the
    file's dtype, reads only the rows the next tile row adds (in column chunks, in parallel, in
    the background while the current row is being processed) and hands out tiles as views.

    Memory: ``tile × width × (bands × bytes per sample + 1)`` for the strip, twice at most.
    """

    def __init__(self, reader: SceneReader, grid: list[list[Tile]], pool, chunks: int = 2):
        self.reader, self.grid, self.pool = reader, grid, pool
        self.chunks = max(1, chunks)
        self._next: tuple[int, list] | None = None  # (first tile row index, futures)
        self._row = 0
        self._data: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        self._top = 0

    def _submit(self, r: int) -> None:
        """Start reading the rows tile row ``r`` adds to the strip."""
        tile = self.grid[r][0]
        start = tile.y if r == 0 else max(tile.y, self.grid[r - 1][0].y + tile.h)
        end = tile.y + tile.h
        futures = []
        if end > start:
            w = self.reader.width
            step = -(-w // self.chunks)
            for x in range(0, w, step):
                futures.append(self.pool.submit(
                    self.reader.read_raw, start, x, end - start, min(step, w - x)))
        self._next = (r, start, futures)

    def prime(self) -> StripFeed:
        if self._next is None and self._row < len(self.grid):
            self._submit(self._row)
        return self

    def _advance(self) -> None:
        r, _, futures = self._next
        parts = [f.result() for f in futures]
        self._next = None
        tile = self.grid[r][0]
        if r + 1 < len(self.grid):
            self._submit(r + 1)
        keep = 0
        if self._data is not None:
            keep = max(self._top + self._data.shape[1] - tile.y, 0)
        new_data = np.concatenate([p[0] for p in parts], axis=2) if parts else None
        new_valid = np.concatenate([p[1] for p in parts], axis=1) if parts else None
        if keep:
            old_d = self._data[:, self._data.shape[1] - keep :]
            old_v = self._valid[self._valid.shape[0] - keep :]
            if new_data is not None:
                self._data = np.concatenate([old_d, new_data], axis=1)
                self._valid = np.concatenate([old_v, new_valid], axis=0)
            else:
                self._data, self._valid = old_d, old_v
        else:
            self._data, self._valid = new_data, new_valid
        self._top = tile.y

    def __iter__(self):
        self.prime()
        while self._row < len(self.grid):
            self._advance()
            for t in self.grid[self._row]:
                rows = slice(t.y - self._top, t.y - self._top + t.h)
                cols = slice(t.x, t.x + t.w)
                yield t, self._data[:, rows, cols], self._valid[rows, cols]
            self._row += 1

    def cancel(self) -> None:
        if self._next is not None:
            for f in self._next[2]:
                f.cancel()
            self._next = None
