"""Atomic, georeferenced GeoTIFF / COG outputs written row band by row band.

Every output is written under a hidden temporary name in its own folder and renamed into place
only when complete, so a crash, Ctrl-C or full disk never leaves a file that looks finished.
Rows arrive from the accumulator in order; they are gathered into whole 512-row block rows so
GDAL compresses each tile exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from crossearth_cli.errors import OutputError

BLOCK = 512
TEMP_PREFIX = "."
TEMP_SUFFIX = ".crossearth-tmp"


def temp_path_for(final: Path) -> Path:
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{tag}{TEMP_SUFFIX}")


def stale_temps(final: Path) -> list[Path]:
    """Temporary files an earlier, killed run left for ``final``."""
    pattern = f"{TEMP_PREFIX}{final.name}.*{TEMP_SUFFIX}"
    return sorted(final.parent.glob(pattern)) if final.parent.is_dir() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temporaries of ``final`` whose writing process is gone (killed runs)."""
    removed = []
    for p in stale_temps(final):
        try:
            pid = int(p.name[len(TEMP_PREFIX) + len(final.name) + 1 :].split(".")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def check_output_path(
    path: Path, overwrite: bool, inputs: Sequence[Path] = (), what: str = "output"
) -> Path:
    """Refuse outputs that exist, equal an input, or sit in a folder we cannot write."""
    path = Path(path)
    for inp in inputs:
        if _same_file(path, Path(inp)):
            raise OutputError(
                f"the {what} is the input file itself", path=path, hint="choose another -o path"
            )
    if path.exists() and path.is_dir():
        raise OutputError(f"the {what} path is a folder", path=path, hint="give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} exists", path=path, hint="pass --overwrite to replace it")
    ensure_writable_folder(path)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def ensure_writable_folder(path: Path) -> None:
    """Create ``path``'s folder if needed and prove we can create files in it."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(
            "cannot create the output folder: part of the path is a file", path=folder
        ) from None
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder ({exc.strerror})", path=folder
        ) from None
    probe = temp_path_for(path)
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"cannot write in the output folder ({exc.strerror or exc})",
            path=folder,
            hint="choose a folder you can write to",
        ) from None


def raise_for_os_error(exc: BaseException, path: Path) -> None:
    """Turn a disk-full or permission error while writing into a clear OutputError."""
    err = exc if isinstance(exc, OSError) else None
    text = str(exc)
    if (err is not None and err.errno == errno.ENOSPC) or "No space left" in text:
        raise OutputError(
            "no space left on the device while writing", path=path, hint="free some space"
        ) from exc
    if err is not None and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise OutputError(f"cannot write ({err.strerror})", path=path) from exc
    if isinstance(exc, RasterioIOError):
        raise OutputError(f"write failed ({text.splitlines()[0]})", path=path) from exc


@dataclass
class RasterSpec:
    """What one output raster looks like (georeferencing comes from the input)."""

    path: Path
    count: int
    dtype: str
    nodata: float | int | None
    colormap: dict[int, tuple[int, int, int, int]] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    band_descriptions: list[str] | None = None
    scales: list[float] | None = None
    compress: str = "deflate"
    cog: bool = False
    overview_resampling: str = "nearest"
    nbits: int | None = None  # 16 with dtype float32 stores IEEE half floats


def _creation_options(spec: RasterSpec) -> dict:
    compress = spec.compress.lower()
    opts = {
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": compress,
        "bigtiff": "IF_SAFER",
        "interleave": "band" if spec.count > 1 else "pixel",
    }
    if compress in ("deflate", "zstd", "lzw"):
        opts["predictor"] = 3 if np.dtype(spec.dtype).kind == "f" else 2
    if compress == "zstd":
        opts["zstd_level"] = 9
    if spec.nbits:
        opts["nbits"] = spec.nbits
    return opts


class GeoTiffSink:
    """One output raster: written under a temporary name, renamed by :meth:`commit`."""

    def __init__(self, spec: RasterSpec, height: int, width: int, crs, transform, gcps=None):
        self.spec, self.height, self.width = spec, height, width
        self.final = Path(spec.path)
        self.tmp = temp_path_for(self.final)
        self._pending: list[tuple[int, np.ndarray]] = []
        self._pending_rows = 0
        self._next_row = 0
        # GDAL compresses in a background thread (rasterio releases the GIL), so encoding one
        # block row overlaps the model's work on the next; at most one write is in flight.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="crossearth-write")
        self._inflight: Future | None = None
        profile = dict(
            driver="GTiff",
            width=width,
            height=height,
            count=spec.count,
            dtype=spec.dtype,
            nodata=spec.nodata,
            **_creation_options(spec),
        )
        if gcps is not None:
            profile["gcps"], profile["crs"] = gcps
        else:
            profile["crs"] = crs
            profile["transform"] = transform
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.ds = rasterio.open(self.tmp, "w", **profile)
            if spec.colormap:
                self.ds.write_colormap(1, spec.colormap)
            if spec.tags:
                self.ds.update_tags(**spec.tags)
            for i, desc in enumerate(spec.band_descriptions or [], start=1):
                self.ds.set_band_description(i, desc)
            if spec.scales:
                self.ds.scales = spec.scales
        except Exception as exc:
            self._cleanup()
            raise_for_os_error(exc, self.final)
            raise

    def write_rows(self, y: int, rows: np.ndarray) -> None:
        """Append rows ``y .. y+h`` (``rows`` is h×W or bands×h×W); rows must come in order."""
        if y != self._next_row:
            raise ValueError(f"rows out of order: expected {self._next_row}, got {y}")
        if rows.ndim == 2:
            rows = rows[None]
        self._pending.append((y, rows))
        self._pending_rows += rows.shape[1]
        self._next_row = y + rows.shape[1]
        if self._pending_rows >= BLOCK or self._next_row == self.height:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        y0 = self._pending[0][0]
        block = np.concatenate([r for _, r in self._pending], axis=1)
        # write whole block rows now, keep the remainder for the next call
        n = block.shape[1]
        full = n if self._next_row == self.height else (n // BLOCK) * BLOCK
        self._wait()
        data = np.ascontiguousarray(block[:, :full])
        self._inflight = self._writer.submit(
            self.ds.write, data, window=Window(0, y0, self.width, full)
        )
        rest = block[:, full:]
        self._pending = [(y0 + full, rest)] if rest.shape[1] else []
        self._pending_rows = rest.shape[1]

    def _wait(self) -> None:
        """Finish the write in flight, turning disk errors into clear ones."""
        fut, self._inflight = self._inflight, None
        if fut is None:
            return
        try:
            fut.result()
        except Exception as exc:
            raise_for_os_error(exc, self.final)
            raise

    def commit(self) -> Path:
        """Close, convert to COG if asked, and rename into place."""
        try:
            self._flush()
            self._wait()
            self._writer.shutdown()
            if self._next_row != self.height:
                raise RuntimeError(f"only {self._next_row} of {self.height} rows were written")
            self.ds.close()
            if self.spec.cog:
                self._to_cog()
            os.replace(self.tmp, self.final)
        except BaseException as exc:
            self._cleanup()
            if isinstance(exc, Exception):
                raise_for_os_error(exc, self.final)
            raise
        return self.final

    def _to_cog(self) -> None:
        cog_tmp = temp_path_for(self.final)
        opts = dict(
            driver="COG",
            compress=self.spec.compress.upper(),
            blocksize=BLOCK,
            overview_resampling=self.spec.overview_resampling.upper(),
            bigtiff="IF_SAFER",
        )
        if self.spec.compress.lower() in ("deflate", "zstd", "lzw"):
            opts["predictor"] = "YES"
        try:
            rasterio.shutil.copy(self.tmp, cog_tmp, **opts)
        except BaseException:
            cog_tmp.unlink(missing_ok=True)
            raise
        os.replace(cog_tmp, self.tmp)

    def abort(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.shutdown(wait=True, cancel_futures=True)
        ds = getattr(self, "ds", None)
        if ds is not None and not ds.closed:
            try:
                ds.close()
            except Exception:  # noqa: BLE001 - already failing; just release the handle
                pass
        self.tmp.unlink(missing_ok=True)


def palette_colormap(palette: Sequence[Sequence[int]] | None) -> dict | None:
    if not palette:
        return None
    cmap = {i: (int(c[0]), int(c[1]), int(c[2]), 255) for i, c in enumerate(palette)}
    cmap[255] = (0, 0, 0, 0)
    return cmap


def class_tags(class_names: Sequence[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {"classes": json.dumps(list(class_names))}
    tags.update({f"class_{i}": name for i, name in enumerate(class_names)})
    if extra:
        tags.update(extra)
    return tags


def read_class_names(path: str | Path) -> list[str] | None:
    """Class names stored by :func:`class_tags` (None for rasters from elsewhere)."""
    with rasterio.open(path) as ds:
        tags = ds.tags()
    if "classes" in tags:
        try:
            return list(json.loads(tags["classes"]))
        except (ValueError, TypeError):
            return None
    return None
