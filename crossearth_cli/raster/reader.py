"""Windowed reads of the input scene: band selection, per-scene scaling, nodata masks.

Tiles come back in the file's pixel type, with a boolean mask of valid pixels; the scene's
scaling (``model_scaling``) says how the engine maps them to the model's 0–255, on the
device. A pixel is invalid when every selected band holds the nodata value, when a mask
(per-dataset, per-band, or an alpha band) marks it, or when any band is not finite (NaN, inf).

Scaling is decided once per scene, never per tile (a per-tile stretch makes seams): 8-bit data
is used as is, anything else is stretched linearly from robust percentiles of a decimated
read (overviews when the file has them, otherwise a sparse grid of small windows, or the
whole scene decimated when that grid finds almost no data).

A paletted raster (one band of colour-table indices) is expanded to the RGB of its colour
table; palette entries with alpha 0 are nodata. Sparse GeoTIFFs (blocks never written, which
GDAL reads as nodata) are not read at all where every selected band is sparse: a huge, mostly
empty mosaic costs what its data costs.

rasterio dataset handles are not thread-safe, so each reader thread opens its own.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import warnings
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from crossearth_cli.errors import ConfigError, InputError, gdal_words, without_names
from crossearth_cli.raster.aoi import AreaOfInterest, PlacedAOI, place_aoi
from crossearth_cli.raster.windows import Tile

try:  # GDAL errors that rasterio raises as they are
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - rasterio always has it; be safe across versions
    CPLE_BaseError = RasterioError

PERCENTILES = (2.0, 98.0)
_SAMPLE_GRID = 12  # windows per axis when the file has no overviews
_SAMPLE_WINDOW = 128  # pixels per side of each sample window
_SAMPLE_TARGET = 1024  # longest side of a decimated read through overviews
# fewer valid pixels than this share of the grid's: the whole scene is read decimated instead
_SAMPLE_MIN_VALID = 0.01
_SATURATED = 0.95  # a given --range that this share of a band's values lies beyond is told


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
    sampled: bool = True  # False: no valid value was found to take percentiles from

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ConfigError(f"range {self.low},{self.high}: the maximum must exceed the minimum")


@dataclass(frozen=True)
class SharedScaling:
    """``--range shared`` resolved for a run: one stretch for all its inputs, from the 2–98 %
    percentiles of their pooled values (:mod:`crossearth_cli.raster.shared_range`)."""

    scaling: tuple[BandScaling, ...]
    files: int  # inputs the values came from


def parse_range(text: str | None, n_bands: int) -> list[BandScaling] | str | None:
    """``auto`` | ``shared`` | ``none`` | ``MIN,MAX`` (all bands) | ``MIN,MAX,...`` (per band).

    ``shared`` stays a word here: a folder run replaces it with :class:`SharedScaling`, and
    one scene is its own set of inputs (the same as ``auto``)."""
    if text is None or text.strip().lower() in ("", "default"):
        return None
    if text.strip().lower() in ("auto", "shared", "none"):
        return text.strip().lower()
    try:
        values = [float(v) for v in text.replace(";", ",").replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(
            f"--range {text!r} is not 'auto', 'shared', 'none' or numbers",
            hint="use e.g. --range 0,3000 or --range auto",
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(
            f"--range {text!r}: the limits must be finite numbers",
            hint="use the data's real range, e.g. --range 0,3000, or --range auto",
        )
    if any(high <= low for low, high in zip(values[::2], values[1::2])):
        raise ConfigError(
            f"--range {text!r}: each maximum must exceed its minimum",
            hint="give MIN,MAX in that order, e.g. --range 0,3000",
        )
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


# while the main thread hides fd 2 (below): the real stderr, for lines that must still show
_real_stderr: int | None = None
_stderr_lock = threading.Lock()


def write_past_quiet_stderr(line: str) -> bool:
    """Write ``line`` to the real stderr if fd 2 is hidden at this moment (a file being
    opened: GDAL may wait on a busy server there, and that wait is worth a note). False when
    stderr is not hidden: print as usual."""
    with _stderr_lock:
        if _real_stderr is None:
            return False
        os.write(_real_stderr, (line + "\n").encode("utf-8", "backslashreplace"))
        return True


@contextmanager
def _quiet_c_stderr():
    """Drop what C code writes straight to file descriptor 2 meanwhile, when the CLI runs
    quietly (it sets ``CPL_LOG`` to the null device).

    libtiff reports some damage (``_tiffSeekProc: Invalid argument.``) with its own write to
    stderr, past GDAL's error handler and ``CPL_LOG``; our one-line error says what matters.
    fd 2 is shared by the whole process, so only the main thread redirects it, and only for
    the moment a file is opened.
    """
    quiet = os.environ.get("CPL_LOG") == os.devnull
    if not quiet or threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    global _real_stderr
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        with _stderr_lock:
            _real_stderr = saved
        yield
    finally:
        with _stderr_lock:
            _real_stderr = None
            os.dup2(saved, 2)
            os.close(saved)


def open_raster(path: str | Path) -> rasterio.DatasetReader:
    """Open ``path`` (a local file, or a URL: see ``raster.remote``) for reading, turning
    every failure into one clear line."""
    from crossearth_cli.raster.remote import (
        RETRIES,
        busy_error,
        explain,
        file_name,
        gdal_path,
        is_remote,
    )

    remote = is_remote(path)
    if remote:
        RETRIES.remember(str(path))  # GDAL's retries are told by this name
        target = gdal_path(path)
    else:
        target = p = Path(path)
        if not p.exists():
            _refuse_gdal_name(str(path))
            if p.is_symlink():
                raise InputError(
                    "is a symbolic link that leads nowhere (a broken link or a loop of links)",
                    path=p, hint="fix or remove the link",
                )
            raise InputError("no such file", path=p, hint="check the path")
        if p.is_dir():
            raise InputError("is a folder, not a raster", path=p)
        if p.stat().st_size == 0:
            raise InputError("is an empty file (0 bytes), not a raster", path=p,
                             hint="an interrupted copy or download? copy it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # not georeferenced, odd TIFF tags: not errors
            with _quiet_c_stderr():
                src = rasterio.open(target)
    except (RasterioError, CPLE_BaseError) as exc:
        if remote:  # named by the URL as given, not by GDAL's path
            what, fix = explain(without_names(str(exc), target, path).replace(target, path))
            if what.startswith(("the server answered", "not a readable raster",
                                "not readable in windows")):
                # GDAL gave up after its retries ("not recognized as a supported format"
                # when it got no bytes at all): the server stayed busy
                busy = busy_error(path)
                if busy is not None:
                    raise busy from exc
            if what.startswith("not found") and "." not in file_name(path):
                fix += "; a folder's URL ends with /"
        else:
            what, fix = _past_its_end(str(exc), p) or (
                f"not a readable raster ({gdal_words(exc, target, path)})",
                "is it a GeoTIFF? convert it with gdal_translate")
        raise InputError(what, path=path, hint=fix) from exc
    except MemoryError as exc:
        raise InputError("raster header asks for more memory than exists", path=path) from exc
    try:
        _check_header(src)
    except BaseException:
        src.close()
        raise
    return src


def _past_its_end(message: str, path: Path) -> tuple[str, str] | None:
    """A TIFF whose directory lies past the end of the file (written last, then the file
    cut short): truncated, not of another format."""
    m = re.search(r"directory at offset (\d+)", message)
    size = path.stat().st_size
    if m is None or int(m.group(1)) < size:
        return None
    return (f"is truncated or corrupt: its header points to byte {int(m.group(1)):,} but the "
            f"file has {size:,} bytes", "copy or download it again")


_VSI_CONTAINERS = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/", "/vsimem/",
                   "/vsisubfile/", "/vsisparse/", "/vsicrypt/", "/vsistdin/", "/vsicached?")


def _refuse_gdal_name(text: str) -> None:
    """A GDAL dataset name that is no file (``/vsizip/…``, ``NETCDF:"f.nc":var``): not read,
    said as such (it was "no such file"). Network ones (``/vsicurl/``, ``/vsis3/``) are
    URLs, read as such before this."""
    if text.startswith(_VSI_CONTAINERS):
        raise InputError("is a GDAL virtual path into an archive or other container: not read "
                         "(network paths, /vsicurl/, /vsis3/, /vsigs/, /vsiaz/, are)", path=text,
                         hint="extract the file first (e.g. unzip; download it first if it is "
                              "on a server) and give its path")
    if re.match(r'[A-Z][A-Z0-9_]*:("[^"]+"|[^:"]+):.', text):  # DRIVER:"file":subdataset
        raise InputError("is a GDAL subdataset name: not read", path=text,
                         hint=f"extract it to a GeoTIFF first: gdal_translate '{text}' out.tif")


def _check_header(src) -> None:
    """Refuse what GDAL opens but nothing can segment (so it fails before any output)."""
    if src.count < 1 and src.subdatasets:  # NetCDF, HDF: a container of rasters
        subs = src.subdatasets
        short = [re.split(r"[:/]", s)[-1] or "subdataset" for s in subs]  # HDF5: //group/name
        names = ", ".join(short[:5]) + (", ..." if len(subs) > 5 else "")
        raise InputError(f"holds {len(subs)} rasters (subdatasets: {names}), not one",
                         path=src.name, hint=f"extract the one to segment first, e.g. "
                         f"gdal_translate '{subs[0]}' {short[0]}.tif")
    if src.count < 1 or src.width < 1 or src.height < 1:
        raise InputError(
            f"has no pixels ({src.width}x{src.height}, {src.count} band(s))", path=src.name
        )
    try:
        src.dtypes, src.block_shapes, src.mask_flag_enums  # noqa: B018 - probe the header
    except (RasterioError, CPLE_BaseError, ValueError, KeyError) as exc:
        raise InputError(f"has an unreadable header ({exc})", path=src.name) from exc


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


@contextmanager
def corrupt_is_input_error(path, what: str):
    """A GDAL read error inside becomes ``InputError("<what>: the file is truncated or
    corrupt")`` naming ``path``."""
    try:
        yield
    except (RasterioError, CPLE_BaseError) as exc:
        busy = server_busy_error(what, str(path))
        if busy is not None:
            raise busy from exc
        missing = _open_failure(exc)
        if missing:  # a VRT (or similar) whose source is gone: say so, not "corrupt"
            raise ReadFailed(f"{what}: it refers to a file that cannot be opened ({missing})",
                             path=path, hint="check the paths of its sources", what=what) from exc
        raise ReadFailed(f"{what}: the file is truncated or corrupt", path=path,
                         hint="copy or download it again", what=what) from exc


class ReadFailed(InputError):
    """A read that failed: a damaged file or a VRT's missing source, as far as GDAL tells;
    for a VRT of URLs, the caller may know better (see :func:`server_busy_error`)."""

    def __init__(self, message: str, path, hint: str, what: str):
        super().__init__(message, path=path, hint=hint)
        self.what = what


def server_busy_error(what: str, url: str) -> InputError | None:
    """:func:`remote.busy_error` for a read of ``url``; None for a local path."""
    from crossearth_cli.raster.remote import busy_error, is_remote

    return busy_error(url, what) if is_remote(url) else None


def _open_failure(exc: BaseException) -> str | None:
    try:
        from rasterio._err import CPLE_OpenFailedError
    except ImportError:  # rasterio's private module moved: just "truncated or corrupt"
        return None

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CPLE_OpenFailedError):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def check_readable(src, bands: list[int] | None = None, name: str | None = None) -> None:
    """Read the last block so a truncated file fails now, before any output exists; the
    error names ``name`` (the path as the user gave it) or else GDAL's."""
    h, w = src.block_shapes[0] if src.block_shapes else (1, src.width)
    window = Window(max(src.width - w, 0), max(src.height - h, 0), min(w, src.width),
                    min(h, src.height))
    with corrupt_is_input_error(name or src.name, "cannot be read to the end"):
        src.read(bands or 1, window=window)


def remote_fingerprint(url: str) -> str:
    """What a rerun compares to tell whether a raster on a server changed since its outputs
    were made (a server gives no file size or time that GDAL passes on): its header, where its
    first and last blocks lie in the file and how many bytes they take, and the last block's
    pixels (band 1). Any re-encoding moves the blocks; a replacement equal in all of these is
    taken for the same file."""
    import hashlib
    import json

    with open_raster(url) as src:
        h, w = src.block_shapes[0]
        last = ((src.width - 1) // w, (src.height - 1) // h)
        blocks = [src.get_tag_item(f"BLOCK_{what}_{x}_{y}", "TIFF", bidx=1)
                  for x, y in ((0, 0), last) for what in ("OFFSET", "SIZE")]
        window = Window(last[0] * w, last[1] * h, src.width - last[0] * w,
                        src.height - last[1] * h)
        with corrupt_is_input_error(url, "cannot be read to the end"):
            pixels = src.read(1, window=window)
        header = [src.driver, src.width, src.height, src.count, src.dtypes, src.block_shapes,
                  src.crs.to_wkt() if src.crs else None, list(src.transform),
                  [str(v) for v in src.nodatavals], blocks]
    digest = hashlib.sha256(json.dumps(header, default=str).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:24]


def probe_input(path: str | Path, bands: list[int] | None = None) -> None:
    """Fail fast (before loading a model) on inputs that cannot be segmented at all."""
    with open_raster(path) as src:
        _check_real(src, path)
        if bands is not None:
            _check_band_numbers(src, path, bands)
        check_readable(src)


def _check_real(src, path) -> None:
    dtypes = set(src.dtypes)
    if any(np.dtype(d).kind == "c" for d in dtypes):
        raise InputError(
            f"has complex pixels ({', '.join(sorted(dtypes))}); the model needs real values",
            path=path,
            hint="convert to amplitude first, e.g. with gdal_calc or gdal_translate",
        )


def _check_band_numbers(src, path, bands: list[int]) -> None:
    for b in bands:
        if not 1 <= b <= src.count:
            hint = f"pass --bands with numbers from 1 to {src.count}"
            if _is_paletted(src):  # its colours are not bands: they come from the table
                hint = ("a paletted raster: leave out --bands to use its colour table's red, "
                        "green, blue, or pass --bands 1,1,1 for its indices")
            raise InputError(f"band {b} is out of range: the raster has {src.count} band(s)",
                             path=path, hint=hint)


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
        if has_rgb:  # red, green, blue (and alpha), and no near-infrared band to be found
            return list(rgb), (
                "the model expects near-infrared, red, green, but the raster's bands are red, "
                "green, blue (no near-infrared band): they are given in that order, so results "
                "may be poor (use an RGB preset, or pass --bands)")
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
        # "run it": in a folder run, --bands would apply to every file
        hint="run it with --bands, e.g. --bands 1,1,1 to give one band as red, green, blue",
    )


def _is_paletted(src) -> bool:
    """One band of colour-table indices (a paletted GeoTIFF, PNG or GIF)."""
    try:
        if src.colorinterp[0] != ColorInterp.palette or src.dtypes[0] not in ("uint8", "uint16"):
            return False
        return bool(src.colormap(1))
    except (ValueError, RasterioError, CPLE_BaseError):
        return False


class _SparseBlocks:
    """Which blocks of a tiled or stripped GeoTIFF were never written (sparse files).

    GDAL reads such a block as the band's nodata value without touching the disk. When every
    selected band marks nodata by value, a region whose blocks are all unwritten in every band
    is all nodata: it is neither read nor sent to the model. Block rows are looked up lazily
    (``BLOCK_OFFSET_x_y`` in GDAL's TIFF metadata domain) and cached.
    """

    def __init__(self, bands: list[int], block_h: int, block_w: int, width: int):
        self.bands, self.block_h, self.block_w = bands, block_h, block_w
        self.n_cols = -(-width // block_w)
        self._rows: dict[int, bool] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_reader(cls, src, bands: list[int], kinds: list[str]) -> _SparseBlocks | None:
        if src.driver != "GTiff" or any(k != "nodata" for k in kinds):
            return None  # without a nodata value an unwritten block reads as real zeros
        shapes = {src.block_shapes[b - 1] for b in bands}
        if len(shapes) != 1:
            return None
        (bh, bw), = shapes
        if bh < 1 or bw < 1:
            return None
        return cls(sorted(set(bands)), bh, bw, src.width)

    def _block_row_empty(self, src, row: int) -> bool:
        with self._lock:
            cached = self._rows.get(row)
        if cached is not None:
            return cached
        empty = True
        for col in range(self.n_cols):
            for b in self.bands:
                if src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=b) is not None:
                    empty = False
                    break
            if not empty:
                break
        with self._lock:
            self._rows[row] = empty
        return empty

    def rows_empty(self, src, y: int, h: int) -> bool:
        if h <= 0:
            return False
        first, last = y // self.block_h, (y + h - 1) // self.block_h
        return all(self._block_row_empty(src, r) for r in range(first, last + 1))


class SceneReader:
    """Reads tiles of one scene; safe to call from several threads at once."""

    def __init__(
        self,
        path: str | Path,
        bands: list[int] | None = None,
        value_range: str | list[BandScaling] | SharedScaling | None = None,
        band_order: str = "RGB",
        aoi: AreaOfInterest | None = None,
    ):
        """``aoi``: :attr:`aoi` says where it falls (:mod:`crossearth_cli.raster.aoi`); the
        scene stays the whole file."""
        from crossearth_cli.raster.remote import gdal_path, is_remote

        # a URL stays the text given (errors name it); its read threads open GDAL's path
        self.path = path if is_remote(path) else Path(path)
        self._target = gdal_path(path) if is_remote(path) else self.path
        src = open_raster(self.path)
        self._handles: list = [src]
        # the handle opened to inspect the file goes to the first thread that reads (a read
        # thread, usually): one open per file fewer, which folders of small files notice
        self._spare = src
        self._local = threading.local()
        self._lock = threading.Lock()
        try:
            self._inspect(src, bands, value_range, band_order)
            self._place(src, aoi)
        except Exception:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------

    def _inspect(self, src, bands, value_range, band_order) -> None:
        self.height, self.width, self.count = src.height, src.width, src.count
        _check_real(src, self.path)
        self.notes: list[str] = []
        self.palette: np.ndarray | None = None  # 3×N uint8 colour table of band 1
        self.takes_shared_range = False  # set with the scaling: pooled by --range shared
        self.key_notes: list[str] = []  # of self.notes, those a folder run tells too
        self._palette_nodata: np.ndarray | None = None  # N bool: entries with alpha 0
        if bands is None and _is_paletted(src):
            self._use_palette(src, band_order)
            bands = [1, 1, 1]
        elif bands is None:
            bands, note = default_bands(src, band_order)
            if note:  # a guess that decides every result: told in folder runs too (once)
                self.notes.append(note)
                self.key_notes.append(note)
        elif _is_paletted(src) and 1 in bands:
            self.notes.append(
                "band 1 is paletted: --bands reads its colour-table indices, not colours "
                "(leave out --bands to use the colours)"
            )
        _check_band_numbers(src, self.path, bands)
        self.bands = list(bands)
        # what is read from the file: band 1 once for a palette, else the selected bands
        self._read_bands = [1] if self.palette is not None else self.bands
        read_dtype = np.result_type(*[np.dtype(src.dtypes[b - 1]) for b in self._read_bands])
        self._read_dtype = read_dtype
        self.dtype = np.dtype(np.uint8) if self.palette is not None else read_dtype
        self._mask_kinds = [mask_kind(src.mask_flag_enums[b - 1]) for b in self._read_bands]
        self._nodata = [src.nodatavals[b - 1] for b in self._read_bands]
        self.crs = src.crs
        self.transform = src.transform
        # columns GDAL decompresses together (the whole width for a striped file)
        self.block_width = src.block_shapes[self._read_bands[0] - 1][1]
        gcps, gcp_crs = src.gcps
        self.gcps = (gcps, gcp_crs) if gcps else None
        self.rpcs = src.rpcs  # a sensor model: kept in the outputs, as GCPs are
        self.profile = src.profile
        # about the outputs, so told with them (a damaged file that fails later in the run
        # then gets its one error line and nothing else)
        self.output_notes: list[str] = []
        if src.crs is None and self.gcps is None and self.rpcs is None:
            if src.transform.is_identity:
                self.output_notes.append(
                    "the raster has no georeferencing (no CRS, no geotransform), e.g. a plain "
                    "PNG or JPEG: the outputs are in pixel coordinates, without a CRS"
                )
            else:
                self.output_notes.append(
                    "the raster has no CRS: the outputs will have none either")
        elif self.gcps is not None and gcp_crs is None:
            self.output_notes.append("the raster's ground control points have no CRS: the "
                                     "outputs keep them without one")
        self._sparse = _SparseBlocks.for_reader(src, self._read_bands, self._mask_kinds)
        self.scaling = self._resolve_scaling(src, value_range)
        self._check_readable(src)

    def _place(self, src, aoi: AreaOfInterest | None) -> None:
        self.aoi: PlacedAOI | None = None
        if aoi is None:
            return
        self.aoi = place_aoi(aoi, self.path, src.crs, src.transform, src.width, src.height,
                             self.gcps is not None or bool(self.rpcs))
        x, y, w, h = self.aoi.window
        share = w * h / (src.width * src.height)
        self.notes.append(f"--aoi: the outputs cover columns {x} to {x + w - 1} and rows {y} to "
                          f"{y + h - 1} of the input ({w}x{h} px, "
                          f"{f'{share:.1%}' if share >= 0.001 else f'{share:.2g}'} of it)")

    def _use_palette(self, src, band_order: str) -> None:
        cmap = src.colormap(1)
        size = 256 if src.dtypes[0] == "uint8" else 65536
        lut = np.zeros((4, size), dtype=np.uint8)
        lut[3] = 255
        for i, rgba in cmap.items():
            if 0 <= i < size:
                lut[:, i] = [int(v) for v in (tuple(rgba) + (255,))[:4]]
        self.palette = np.ascontiguousarray(lut[:3])
        self._palette_nodata = lut[3] == 0
        note = "paletted raster: its colour table is expanded to red, green, blue"
        if band_order == "IRRG":
            note += "; the model expects near-infrared, red, green, so results may be poor"
        self.notes.append(note)

    def _resolve_scaling(self, src, value_range) -> list[BandScaling] | None:
        if isinstance(value_range, list):
            if len(value_range) != len(self.bands):
                raise ConfigError(f"--range gives {len(value_range)} bands, expected 3")
            with corrupt_is_input_error(self.path, "read failed while sampling its values"):
                told = given_range_notes(src, self.bands, value_range,
                                         sample=not isinstance(self.path, str))  # str: a URL
            self.notes += told
            self.key_notes += told  # a wrong --range spoils every result: told in folders too
            return value_range
        if self.palette is not None:
            return None  # colours from the table are 8-bit already
        all_uint8 = all(src.dtypes[b - 1] == "uint8" for b in self.bands)
        # what --range shared pools and stretches: what the default would stretch (8-bit
        # data is used as it is, and colour-table indices are no values to pool)
        self.takes_shared_range = not all_uint8 and not (_is_paletted(src) and 1 in self.bands)
        if isinstance(value_range, SharedScaling):
            if not self.takes_shared_range:
                return None
            self.notes.append(_scaling_note(f"the {PERCENTILES[0]:g}-{PERCENTILES[1]:g} "
                                            f"percentiles of {value_range.files} inputs "
                                            "together (--range shared)",
                                            self.bands, value_range.scaling))
            return list(value_range.scaling)
        if value_range == "none" or (value_range is None and all_uint8):
            return None
        with corrupt_is_input_error(self.path, "read failed while sampling its value range"):
            scaling = scene_percentiles(src, self.bands)
        if not any(s.sampled for s in scaling):
            self.notes.append("no valid pixel was found while sampling the value range: the "
                              "scene looks like nodata everywhere (if it is not, give its "
                              "range with --range MIN,MAX)")
            return scaling
        self.notes.append(_scaling_note(
            f"the scene's {PERCENTILES[0]:g}-{PERCENTILES[1]:g} percentiles", self.bands, scaling))
        return scaling

    def sample_values(self) -> list[tuple[np.ndarray, int]]:
        """What ``--range auto`` samples of the selected bands (see :func:`sample_values`)."""
        with corrupt_is_input_error(self.path, "read failed while sampling its value range"):
            return sample_values(self._src(), self.bands)

    def _check_readable(self, src) -> None:
        check_readable(src, self._read_bands)

    # -- reading ------------------------------------------------------------------------

    def _src(self):
        src = getattr(self._local, "src", None)
        if src is None:
            with self._lock:
                src, self._spare = self._spare, None
            if src is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    src = rasterio.open(self._target)
                with self._lock:
                    self._handles.append(src)
            self._local.src = src
        return src

    def rows_empty(self, y: int, h: int) -> bool:
        """Whether rows ``y .. y+h`` hold no data at all: every selected band's blocks there
        were never written (sparse GeoTIFF) and read as nodata. Answered from the TIFF's block
        table, without reading or decompressing anything."""
        return self._sparse is not None and self._sparse.rows_empty(self._src(), y, h)

    def tile_needed(self, tile: Tile) -> bool:
        """False for a tile outside the AOI's polygons: none of its pixels is output."""
        return self.aoi is None or self.aoi.touches(tile.x, tile.y, tile.w, tile.h)

    def read_window(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        data, valid = self.read_raw(y, x, h, w)
        return self.to_model_scale(data, valid), valid

    def read_raw(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(3×h×w in :attr:`dtype`, h×w bool valid): one read, masks derived from it."""
        src = self._src()
        window = Window(x, y, w, h)
        with corrupt_is_input_error(
                self.path, f"read failed at rows {y} to {y + h - 1}, columns {x} to {x + w - 1}"):
            data = src.read(self._read_bands, window=window, out_dtype=self._read_dtype)
            valid = np.ones((h, w), dtype=bool)
            by_value = [i for i, k in enumerate(self._mask_kinds) if k == "nodata"]
            if by_value:  # nodata only where every such band holds its nodata value
                hit = np.ones((h, w), dtype=bool)
                for i in by_value:
                    hit &= _equals_nodata(data[i], self._nodata[i])
                valid &= ~hit
            for i, kind in enumerate(self._mask_kinds):
                if kind == "mask":  # per-dataset / per-band mask or alpha: GDAL reads it
                    valid &= src.read_masks(self._read_bands[i], window=window) > 0
        if self.palette is not None:
            index = data[0]
            if self._palette_nodata.any():
                valid &= ~self._palette_nodata[index]
            return self.palette[:, index], valid
        if self.dtype.kind == "f":
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

    def to_model_scale(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw pixels → float32 on the 0–255 scale, invalid pixels 0 (numpy, for one tile)."""
        out = data.astype(np.float32)
        out[:, ~valid] = 0.0
        s = self.model_scaling()
        if s.low is not None:
            out -= s.low[:, None, None]
            out *= s.factor[:, None, None]
        if s.clip:
            np.clip(out, 0.0, 255.0, out=out)
        return out

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
            self._spare = None
        self._local = threading.local()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scaling_note(source: str, bands: list[int], scaling) -> str:
    return f"scaled to 0-255 from {source}: " + "; ".join(
        f"band {b}: {s.low:.6g}..{s.high:.6g}" if s.sampled
        else f"band {b}: no valid values (0..255 assumed)"
        for b, s in zip(bands, scaling))


def _sample_windows(height: int, width: int) -> list[Window]:
    n_y = min(_SAMPLE_GRID, max(1, height // _SAMPLE_WINDOW))
    n_x = min(_SAMPLE_GRID, max(1, width // _SAMPLE_WINDOW))
    wh, ww = min(_SAMPLE_WINDOW, height), min(_SAMPLE_WINDOW, width)
    ys = np.linspace(0, height - wh, n_y).astype(int)
    xs = np.linspace(0, width - ww, n_x).astype(int)
    return [Window(int(x), int(y), ww, wh) for y in ys for x in xs]


def _decimated_shape(src, count: int) -> tuple[int, int, int]:
    """``count`` bands of the scene read at most :data:`_SAMPLE_TARGET` px on its long side."""
    scale = max(1.0, max(src.width, src.height) / _SAMPLE_TARGET)
    return (count, max(1, int(round(src.height / scale))), max(1, int(round(src.width / scale))))


def given_range_notes(src, bands: list[int], scaling: list[BandScaling],
                      sample: bool = True) -> list[str]:
    """What to tell of a ``--range MIN,MAX`` given for this scene: bands stored scaled (GIS
    software shows stored × scale + offset; the range is in stored values), and bands whose
    sampled values nearly all lie beyond it (they reach the model all white or all black).
    The values are the sparse grid's alone (no whole-scene fallback), and none with
    ``sample=False`` (a file on a server: each window is a request). The notes name no
    per-file figure, so a folder run tells each once, with the files it concerns."""
    notes = []
    scaled = [(b, src.scales[b - 1], src.offsets[b - 1]) for b in dict.fromkeys(bands)
              if (src.scales[b - 1], src.offsets[b - 1]) != (1.0, 0.0)]
    if scaled:
        notes.append("--range is in the values the file stores; " + "; ".join(
            f"band {b} stores them scaled (shown in GIS software as stored × {k:g} + {o:g})"
            for b, k, o in scaled))
    if not sample:
        return notes
    limits: dict[int, BandScaling] = {}  # each band once, read once (--bands 1,1,1)
    for b, s in zip(bands, scaling):
        limits.setdefault(b, s)
    for (values, _), (b, s) in zip(sample_values(src, list(limits), dense=False),
                                   limits.items()):
        if values.size == 0:
            continue
        for share, side, limit in ((np.mean(values >= s.high), "maximum", s.high),
                                   (np.mean(values <= s.low), "minimum", s.low)):
            if share >= _SATURATED:
                notes.append(f"--range: {_SATURATED:.0%} or more of band {b}'s sampled values "
                             f"are at or beyond its {side} ({limit:g}): they reach the model "
                             f"all {'white' if side == 'maximum' else 'black'} (--range auto "
                             "stretches each scene from its own values)")
    return notes


def _every_kth(src, bands: list[int]):
    """Every k-th row and column of the scene (at most :data:`_SAMPLE_TARGET` on its long side),
    read a row of blocks at a time at full resolution and thinned here. GDAL's own decimated
    read (with masks) decodes the same blocks far more slowly: 54.5 s against 1.5 s for an
    all-nodata 12288² 3-band uint16 file here. Pieces are multiples of k: the thinning stays
    regular."""
    k = max(1, -(-max(src.width, src.height) // _SAMPLE_TARGET))
    rows = max(src.block_shapes[0][0], k)
    rows -= rows % k
    cols = max(k, (8192 // k) * k)
    for y in range(0, src.height, rows):
        h = min(rows, src.height - y)
        for x in range(0, src.width, cols):
            w = min(cols, src.width - x)
            yield src.read(bands, window=Window(x, y, w, h), masked=True)[:, ::k, ::k].astype(
                "float64")


def scene_percentiles(src, bands: list[int]) -> list[BandScaling]:
    """Robust per-band 2–98 % percentiles from overviews or a sparse grid of windows."""
    return [percentile_scaling(values) for values, _ in sample_values(src, bands)]


def sample_values(src, bands: list[int], dense: bool = True) -> list[tuple[np.ndarray, int]]:
    """Per band: the valid, finite values of a decimated read (through overviews) or of a
    sparse grid of windows, with the number of pixels read (valid or not). ``dense``: where
    the grid finds almost no data, every k-th row and column of the whole scene instead."""
    has_overviews = bool(src.overviews(bands[0]))
    if has_overviews or src.width * src.height <= _SAMPLE_TARGET**2:
        chunks = [src.read(bands, out_shape=_decimated_shape(src, len(bands)), masked=True,
                           out_dtype="float64")]
    else:
        chunks = [
            src.read(bands, window=w, masked=True, out_dtype="float64")
            for w in _sample_windows(src.height, src.width)
        ]
        valid = min(sum(int(c[i].count()) for c in chunks) for i in range(len(bands)))
        if dense and valid < _SAMPLE_MIN_VALID * sum(c[0].size for c in chunks):
            # data in narrow areas between the windows (a corridor, a clipped strip): the
            # whole scene, decimated; it decodes every block once, on mostly empty scenes only
            chunks = list(_every_kth(src, bands))
    read = sum(c[0].size for c in chunks)
    result = []
    for i in range(len(bands)):
        values = np.concatenate([np.ma.compressed(c[i]) for c in chunks])
        result.append((values[np.isfinite(values)], read))
    return result


def percentile_scaling(values: np.ndarray) -> BandScaling:
    """The 2–98 % stretch of one band's sampled values (0..255, unsampled, if none)."""
    if values.size == 0:
        return BandScaling(0.0, 255.0, sampled=False)
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    return stretch(lo, hi)


def stretch(lo: float, hi: float) -> BandScaling:
    """``lo..hi``, widened when the values are all one (by 1, or by the next float above
    ``lo`` where 1 is below its precision: |lo| ≥ 2⁵³)."""
    if not hi > lo:
        hi = max(lo + 1.0, float(np.nextafter(lo, np.inf)))
    return BandScaling(lo, hi)


MIN_CHUNK_COLUMNS = 1024  # narrower reads are not worth a thread (and its file handle)


def column_chunks(x0: int, x1: int, n: int, block: int) -> list[tuple[int, int]]:
    """Columns ``x0 .. x1`` cut into at most ``n`` pieces read in parallel, as (start, end).

    Cuts fall on the file's block columns, so no block is decompressed by two threads (a
    striped file, whose block is its whole width, is read in one piece), and no piece is
    narrower than :data:`MIN_CHUNK_COLUMNS` unless it is the whole range.
    """
    first, last = x0 // block, -(-x1 // block)  # block columns touched
    pieces = max(1, min(n, last - first, (x1 - x0) // MIN_CHUNK_COLUMNS))
    cuts = [x0] + [(first + round(i * (last - first) / pieces)) * block
                   for i in range(1, pieces)] + [x1]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def cpu_io_threads() -> int:
    """Reader threads: two are enough to hide reads behind compute on most disks."""
    from crossearth_cli.cpus import available_cpus

    return max(1, min(4, available_cpus() // 2))


# Reader threads for rasters on a server: they mostly wait for round trips, not for a core,
# so there are more of them (each a range request of its own in flight)
NETWORK_IO_THREADS = 8


class StripFeed:
    """Feeds a scene's tiles row by row from full-width strips of rows, each pixel read once.

    Tile rows overlap vertically and tiles overlap horizontally; reading tile windows would
    decompress most pixels 2-3 times. Instead the feed keeps a strip of ``tile`` rows in the
    file's dtype, reads only the rows the next tile row adds (in column chunks, in parallel, in
    the background while the current row is being processed) and hands out tiles as views.

    Rows a sparse GeoTIFF never wrote (:meth:`SceneReader.rows_empty`) are not read: while the
    whole strip is empty, tiles come out as shared all-nodata arrays, and nothing is allocated.
    With an AOI, tiles that touch none of its polygons come out so too, and rows that only such
    tiles use are not read.

    Memory: ``tile × width × (bands × bytes per sample + 1)`` for the strip, twice at most
    (``width``: the stripe's, for scenes read in vertical stripes).
    """

    def __init__(self, reader: SceneReader, grid: list[list[Tile]], pool, chunks: int = 2,
                 columns: tuple[int, int] | None = None):
        """``columns=(x0, x1)``: read only these pixel columns (a stripe of a wide scene);
        ``grid`` then holds only the tiles inside them."""
        self.reader, self.grid, self.pool = reader, grid, pool
        self.chunks = max(1, chunks)
        self.x0, self.x1 = columns if columns is not None else (0, reader.width)
        # (tile row index, first row, end row, futures; None when the rows are all empty)
        self._next: tuple[int, int, int, list | None] | None = None
        self._row = 0
        self._data: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        self._h = 0  # rows in the strip
        self._empty = False  # the strip holds only nodata (and _data/_valid are None)
        self._top = 0
        self._blank: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        # with an AOI: which tiles reach its polygons (asked once per tile, not per read)
        self._needed = ([[reader.tile_needed(t) for t in row] for row in grid]
                        if reader.aoi is not None else None)

    def _submit(self, r: int) -> None:
        """Start reading the rows tile row ``r`` adds to the strip."""
        tile = self.grid[r][0]
        start = tile.y if r == 0 else max(tile.y, self.grid[r - 1][0].y + tile.h)
        end = tile.y + tile.h
        futures: list | None = []
        if end > start and (self.reader.rows_empty(start, end - start)
                            or not self._rows_needed(start, end)):
            futures = None
        elif end > start:
            for a, b in column_chunks(self.x0, self.x1, self.chunks, self.reader.block_width):
                futures.append(self.pool.submit(self.reader.read_raw, start, a, end - start,
                                                b - a))
        self._next = (r, start, end, futures)

    def _rows_needed(self, start: int, end: int) -> bool:
        """Whether a tile that runs (inside the AOI, if any) uses rows ``start .. end``."""
        if self._needed is None:
            return True
        return any(any(flags) for row, flags in zip(self.grid, self._needed)
                   if row[0].y < end and row[0].y + row[0].h > start)

    def prime(self) -> StripFeed:
        if self._next is None and self._row < len(self.grid):
            self._submit(self._row)
        return self

    def _zeros(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        w = self.x1 - self.x0
        return (np.zeros((len(self.reader.bands), h, w), dtype=self.reader.dtype),
                np.zeros((h, w), dtype=bool))

    def _advance(self) -> None:
        r, start, end, futures = self._next
        parts = [f.result() for f in futures] if futures else []
        self._next = None
        tile = self.grid[r][0]
        if r + 1 < len(self.grid):
            self._submit(r + 1)
        keep = max(self._top + self._h - tile.y, 0) if self._h else 0
        n_new = max(end - start, 0)
        new_empty = futures is None
        if keep and not self._empty and not self._valid[self._h - keep :].any():
            self._empty, self._data, self._valid = True, None, None  # kept rows: all nodata
        if (keep == 0 or self._empty) and (n_new == 0 or new_empty):
            self._data = self._valid = None  # nothing but nodata: no arrays at all
            self._empty = True
        else:
            pieces_d, pieces_v = [], []
            if keep:
                if self._empty:
                    old_d, old_v = self._zeros(keep)
                else:
                    old_d, old_v = self._data[:, self._h - keep :], self._valid[self._h - keep :]
                pieces_d.append(old_d)
                pieces_v.append(old_v)
            if n_new:
                if new_empty:
                    new_d, new_v = self._zeros(n_new)
                else:
                    new_d = np.concatenate([p[0] for p in parts], axis=2)
                    new_v = np.concatenate([p[1] for p in parts], axis=1)
                pieces_d.append(new_d)
                pieces_v.append(new_v)
            if len(pieces_d) == 1:
                self._data, self._valid = pieces_d[0], pieces_v[0]
            else:
                self._data = np.concatenate(pieces_d, axis=1)
                self._valid = np.concatenate(pieces_v, axis=0)
            self._empty = False
        self._h = keep + n_new
        self._top = tile.y

    def _blank_tile(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Shared read-only all-nodata arrays for a tile of an empty strip."""
        blank = self._blank.get((h, w))
        if blank is None:
            data = np.zeros((len(self.reader.bands), h, w), dtype=self.reader.dtype)
            valid = np.zeros((h, w), dtype=bool)
            data.flags.writeable = valid.flags.writeable = False
            blank = self._blank[(h, w)] = (data, valid)
        return blank

    def __iter__(self):
        self.prime()
        while self._row < len(self.grid):
            self._advance()
            needed = self._needed[self._row] if self._needed is not None else None
            for j, t in enumerate(self.grid[self._row]):
                if self._empty or (needed is not None and not needed[j]):
                    yield (t, *self._blank_tile(t.h, t.w))
                    continue
                rows = slice(t.y - self._top, t.y - self._top + t.h)
                cols = slice(t.x - self.x0, t.x - self.x0 + t.w)
                yield t, self._data[:, rows, cols], self._valid[rows, cols]
            self._row += 1

    def cancel(self) -> None:
        """Stop reading ahead and let the strip go. Returns once none of this feed's reads is
        running: the reader is usually closed next, and closing a GDAL dataset under a running
        read crashes the process (seen as a segfault when a SIGTERM stopped a folder run)."""
        if self._next is not None:
            futures = self._next[3] or []
            for f in futures:
                f.cancel()  # not started yet: never will be
            wait(futures)  # started: let them finish
            self._next = None
        # the scene keeps its first stripe's feed: without this, that stripe's last strip
        # would stay referenced while the next stripes run
        self._data = self._valid = None
        self._blank.clear()
