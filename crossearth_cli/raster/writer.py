"""Atomic, georeferenced GeoTIFF / COG outputs written row band by row band.

Every output is written under a hidden temporary name in its own folder and renamed into place
only when complete, so a crash, Ctrl-C or full disk never leaves a file that looks finished.
Rows arrive from the accumulator in order; they are gathered into whole 512-row block rows so
GDAL compresses each tile exactly once.
"""

from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import Interleaving
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from crossearth_cli.errors import OutputError
from crossearth_cli.raster.reader import CPLE_BaseError  # GDAL's errors as rasterio raises them

BLOCK = 512
TEMP_PREFIX = "."
TEMP_SUFFIX = ".crossearth-tmp"


def temp_path_for(final: Path, extension: str = "") -> Path:
    """``.NAME.PID.TAG.crossearth-tmp`` beside ``final``; ``extension`` (".gpkg") for a
    driver that wants its own (one of :data:`_GDAL_SIDE_FILES`)."""
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    return final.with_name(
        f"{TEMP_PREFIX}{_short_name(final.name)}.{tag}{TEMP_SUFFIX}{extension}")


def _short_name(name: str) -> str:
    """``name`` as the hidden files made from it (temporaries, row parts) hold it: over 150
    bytes it is cut to 120 and hashed, so that what they add (~40 bytes for a temporary,
    ~53 for a row part's temporary) keeps them within the file system's 255 bytes."""
    raw = name.encode()
    if len(raw) <= 150:
        return name
    return f"{raw[:120].decode(errors='ignore')}~{hashlib.sha1(raw).hexdigest()[:10]}"


# Temporaries this process has created and not yet renamed or removed. A signal can land
# between two bytecodes anywhere (say, after a sink created its file but before the engine
# recorded the sink); the CLI removes whatever is still listed when it exits.
_live_temps: set[Path] = set()
_live_guard = threading.Lock()


def _track(path: Path) -> Path:
    with _live_guard:
        _live_temps.add(path)
    return path


def _untrack(path: Path) -> None:
    with _live_guard:
        _live_temps.discard(path)


def remove_own_temporaries() -> list[Path]:
    """Delete the temporaries of this process that are still on disk (end of a CLI run)."""
    with _live_guard:
        paths = sorted(_live_temps)
        _live_temps.clear()
    removed = []
    for p in paths:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return removed


# files GDAL makes beside a file it writes (the COG driver's overviews), left if it is
# killed; a GeoPackage's temporary is named as a raster's with ".gpkg" (and SQLite's journals)
_GDAL_SIDE_FILES = (".ovr.tmp", ".gpkg", ".gpkg-journal", ".gpkg-wal", ".gpkg-shm")


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(output name, writing process) of a temporary ``.NAME.PID.TAG.crossearth-tmp``, or of
    a file GDAL made beside one."""
    for side in _GDAL_SIDE_FILES:
        if name.endswith(TEMP_SUFFIX + side):
            name = name[: -len(side)]
    if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)].rsplit(".", 2)
    try:
        return (parts[0], int(parts[1])) if len(parts) == 3 else None
    except ValueError:
        return None


def _writer_gone(pid: int) -> bool:
    """The process that wrote a temporary is neither this one nor alive."""
    return pid != os.getpid() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- row parts of a scene split across torchrun ranks ------------------------------------

_PART_TAIL = re.compile(r"\.part(\d{3,})-of-(\d{3,})\.tif$")


def _part_prefix(final: Path) -> str:
    """``.NAME.part``: what every row part of ``final`` is named from, a long name cut and
    hashed (:func:`_short_name`: in bytes, as the file system counts)."""
    return f"{TEMP_PREFIX}{_short_name(Path(final).name)}.part"


def part_path(final: Path, index: int, count: int) -> Path:
    """Hidden file holding rows of part ``index`` of ``count`` of ``final``."""
    return Path(final).with_name(f"{_part_prefix(final)}{index:03d}-of-{count:03d}.tif")


def _part_of(name: str) -> tuple[str, int, int] | None:
    """(prefix, index, count) of a part's file name, or of the part a temporary or lock file
    belongs to; None for other names."""
    if name.endswith(TEMP_SUFFIX):
        owner = _temp_owner(name)
        name = owner[0] if owner else ""
    elif name.startswith(TEMP_PREFIX) and name.endswith(LOCK_SUFFIX):
        name = name[len(TEMP_PREFIX) : -len(LOCK_SUFFIX)]
    m = _PART_TAIL.search(name)
    if m is None or not name.startswith(TEMP_PREFIX):
        return None
    return name[: m.start()] + ".part", int(m.group(1)), int(m.group(2))


# folder -> {output name: its temporaries and their writers' pids}, and folder -> {part
# prefix: row-part files, their temporaries and locks}, listed once per folder and process
_temp_index: dict[str, dict[str, list[tuple[Path, int]]]] = {}
_part_index: dict[str, dict[str, list[tuple[Path, int, int]]]] = {}


def _indexed(folder: Path) -> tuple[dict, dict]:
    key = os.path.abspath(folder)
    temps = _temp_index.get(key)
    if temps is None:
        temps, parts = _temp_index[key], _part_index[key] = {}, {}
        try:
            names = os.listdir(folder)
        except OSError:  # no folder (yet): nothing was left in it
            names = []
        for name in names:
            part = _part_of(name)
            if part is not None:
                parts.setdefault(part[0], []).append((folder / name, part[1], part[2]))
            owner = _temp_owner(name)
            if owner is not None:
                temps.setdefault(owner[0], []).append((folder / name, owner[1]))
    return temps, _part_index[key]


def stale_temps(final: Path) -> list[tuple[Path, int]]:
    """Temporaries an earlier run left for ``final``, each with its writer's pid, from one
    listing of its folder per process: a folder run looks each output up instead of listing
    the folder once per file (at 30,000 entries a listing took 19 ms). Each output is looked
    up once, when it is about to be written; temporaries that appear later are the next
    run's to remove."""
    with _live_guard:
        temps, _ = _indexed(Path(final).parent)
        return sorted(temps.pop(_short_name(Path(final).name), []))


def remove_stale_parts(final: Path, job: tuple[int, int] | None = None) -> list[Path]:
    """Delete the row parts an interrupted ``torchrun`` job left for ``final`` (hidden files
    no other run would touch), with their temporaries and locks where their writers are gone.

    Called with ``final``'s lock held. ``job=(index, count)``: this process is rank ``index``
    of a job of ``count`` ranks; parts of the other ranks of that count may be this job's
    own, written already, and are left (each rank rewrites its own part)."""
    with _live_guard:
        _, parts = _indexed(Path(final).parent)
        found = parts.pop(_part_prefix(final), [])
    removed = []
    for path, index, count in sorted(found):
        if job is not None and count == job[1] and index != job[0]:
            continue
        name = path.name
        if name.endswith(TEMP_SUFFIX) and not _writer_gone(_temp_owner(name)[1]):
            continue
        if name.endswith(LOCK_SUFFIX):
            part = path.with_name(name[len(TEMP_PREFIX) : -len(LOCK_SUFFIX)])
            if os.path.abspath(part) in _locks:  # ours
                continue
            try:  # taken and released: removed, unless a live process holds it
                lock_output(part)
            except OutputError:
                continue
            release_output_lock(part)
            removed.append(path)
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete the temporaries of ``final`` whose writing process is gone (killed runs); called
    with ``final``'s lock held, so no live run of ours is writing it."""
    removed = []
    for p, pid in stale_temps(final):
        if _writer_gone(pid):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def check_output_path(
    path: Path, overwrite: bool, inputs: Sequence[Path] = (), what: str = "output"
) -> Path:
    """Refuse outputs that exist, equal an input, sit in a folder we cannot write, or that
    another run is writing right now; then hold the output's lock (see :func:`lock_output`)."""
    path = Path(path)
    for inp in inputs:
        if same_path(path, Path(inp)):
            raise OutputError(
                f"the {what} is the input file itself", path=path, hint="choose another -o path"
            )
    if path.exists() and path.is_dir():
        raise OutputError(f"the {what} path is a folder", path=path, hint="give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} exists", path=path, hint="pass --overwrite to replace it")
    ensure_writable_folder(path)
    lock_output(path)
    return path


def same_path(a: Path, b: Path) -> bool:
    """The same file, existing (hard and symbolic links included) or yet to be written."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the names as given
        return a.absolute() == b.absolute()


def ensure_writable_folder(path: Path, folder_of: str = "the output folder") -> None:
    """Create ``path``'s folder if needed and prove we can create files in it.
    ``folder_of`` names it in errors ("the folder of --summary")."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(
            f"cannot create {folder_of}: part of the path is a file", path=folder,
            hint="choose another path",
        ) from None
    except OSError as exc:
        raise OutputError(
            f"cannot create {folder_of} ({exc.strerror})", path=folder,
            hint="choose a folder you can write to",
        ) from None
    probe = _track(temp_path_for(path))
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
        _untrack(probe)
    except OSError as exc:
        raise OutputError(
            f"cannot write in {folder_of} ({exc.strerror or exc})",
            path=folder,
            hint="choose a folder you can write to",
        ) from None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


LOW_SPACE = 16 << 20  # after a failed write, less free space than this means "disk full"


def disk_full(exc: BaseException, folder: Path, failed_write: bool = False) -> bool:
    """Whether ``exc`` means the disk holding ``folder`` is full: ENOSPC / EDQUOT in its
    chain, or, after a write that failed without saying why (``failed_write``; GDAL's own
    errors are such), little free space left in ``folder``."""
    chain = list(_chain(exc))
    errnos = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain)
    if errnos & {errno.ENOSPC, errno.EDQUOT} or "No space left" in text or "Disk quota" in text:
        return True
    if not (failed_write or _gdal_failed(chain)):
        return False
    free = _free_bytes(Path(folder))
    return free is not None and free < LOW_SPACE


def _gdal_failed(chain: list[BaseException]) -> bool:
    return (any(isinstance(e, (RasterioIOError, CPLE_BaseError)) for e in chain)
            or any("Write failed" in str(e) for e in chain))


def raise_if_disk_full(exc: BaseException, path: Path, failed_write: bool = False) -> None:
    """Raise the one-line OutputError for ``path`` if ``exc`` means its disk is full (see
    :func:`disk_full`)."""
    if disk_full(exc, Path(path).parent, failed_write):
        raise OutputError(
            "no space left on the device while writing", path=path, hint="free some space"
        ) from exc


def raise_for_os_error(exc: BaseException, path: Path) -> None:
    """Turn a disk-full or permission error while writing into a clear OutputError.

    GDAL reports a full disk as "Write failed" (libtiff's ENOSPC text goes to stderr, not into
    the exception), so after a failed write the free space of the folder decides.
    """
    path = Path(path)
    raise_if_disk_full(exc, path)
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write ({e.strerror})", path=path) from exc
    if _gdal_failed(chain):
        first = next((str(e).splitlines()[0] for e in chain if str(e).strip()), "unknown")
        raise OutputError(f"write failed ({first})", path=path) from exc


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` gets ``text`` through a temporary beside it and a rename: a full disk leaves
    no half file and no temporary, and says so naming ``path``."""
    tmp = _track(temp_path_for(path))
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise_for_os_error(exc, path)
        raise
    finally:
        _untrack(tmp)


# -- one writer per output: a lock file beside it ----------------------------------------------

LOCK_SUFFIX = ".lock"
_locks: dict[str, tuple[int, Path]] = {}
_locks_guard = threading.RLock()


def lock_path_for(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}{LOCK_SUFFIX}")


def _job_id() -> str | None:
    """Processes of one ``torchrun`` job share their outputs (rank 0 merges the parts)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run:
        return None
    return f"{run}@{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _holder(lock: Path) -> dict:
    """What the process holding ``lock`` wrote into it (it may not have written yet)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            text = lock.read_text()
            if text.strip():
                found = json.loads(text)
                return found if isinstance(found, dict) else {}  # a stranger's lock file
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)


def lock_output(final: Path) -> None:
    """Hold an exclusive lock for writing ``final`` until :func:`release_output_lock`.

    ``fcntl.flock`` on ``.NAME.lock`` beside the output, taken without waiting: a second run
    writing the same output is refused at once (OutputError naming the other process) instead
    of racing it. The kernel drops the lock when its process dies, so the lock file of a killed
    run never blocks anyone; the next run takes it over and removes it. Re-entrant within a
    process. On a file system without locks, outputs are written unlocked.
    """
    import fcntl

    final = Path(final)
    key = os.path.abspath(final)
    with _locks_guard:
        if key in _locks:
            return
        lock = lock_path_for(final)
        for _ in range(20):
            writable = True
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except PermissionError:  # another user's lock file: flock needs no write access
                writable = False
                try:
                    fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise OutputError(
                        f"cannot open the lock file {lock.name} ({exc.strerror})",
                        path=final.parent, hint="choose a folder you can write to",
                    ) from None
            except OSError as exc:
                raise OutputError(
                    f"cannot create the lock file {lock.name} ({exc.strerror})",
                    path=final.parent, hint="choose a folder you can write to",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _holder(lock)
                job = _job_id()
                if job is not None and holder.get("job") == job:
                    return  # another rank of this torchrun job: rank 0 writes the final file
                who = f"pid {holder['pid']}" if holder.get("pid") else "another process"
                if holder.get("host") and holder.get("host") != socket.gethostname():
                    who += f" on {holder['host']}"
                raise OutputError(
                    f"another crossearth run ({who}) is writing this output right now",
                    path=final, hint="wait for it to finish, or choose another output",
                ) from None
            except OSError:  # ENOLCK / EOPNOTSUPP: no locking on this file system
                os.close(fd)
                return
            try:  # a run releasing it may have removed the file we just locked: retry
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if writable:
                info = {"pid": os.getpid(), "host": socket.gethostname(), "job": _job_id(),
                        "output": final.name, "since": round(time.time(), 3)}
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps(info).encode())
                except OSError as exc:  # a full disk: refuse now, and leave no lock file
                    _remove_held_lock(fd, lock)
                    raise_for_os_error(exc, final)
                    raise OutputError(f"cannot write the lock file {lock.name} "
                                      f"({exc.strerror})", path=final.parent) from None
            _locks[key] = (fd, lock)
            return
        raise OutputError("cannot take the output's lock (it keeps changing)", path=final)


def release_output_lock(final: Path) -> None:
    """Release and remove the lock :func:`lock_output` took for ``final`` (no-op otherwise)."""
    with _locks_guard:
        held = _locks.pop(os.path.abspath(Path(final)), None)
    if held is not None:
        _remove_held_lock(*held)


def _remove_held_lock(fd: int, lock: Path) -> None:
    try:  # remove it while still holding it, so a waiter can tell it went stale
        if os.path.samestat(os.fstat(fd), os.stat(lock)):
            lock.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def release_output_locks() -> None:
    """Release every lock this process holds (end of a CLI run, interpreter exit)."""
    with _locks_guard:
        keys = list(_locks)
    for key in keys:
        release_output_lock(Path(key))


atexit.register(release_output_locks)
atexit.register(remove_own_temporaries)


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
    threads: int = 1  # GDAL compression threads (compression_threads)


def compression_threads(model_on_cpu: bool = False) -> int:
    """GDAL threads that compress the blocks of a block row in parallel: 1 (GDAL's own, in the
    writer thread) beside a model on the CPU, which has the cores; otherwise half the cores, at
    most 8. On a GPU machine one thread per output capped `segment` at ~22 Mpx/s with noisy
    classes, below the model's speed (docs/performance.md). ``CROSSEARTH_COMPRESS_THREADS``
    sets it."""
    env = os.environ.get("CROSSEARTH_COMPRESS_THREADS")
    if env:
        return max(1, int(env))
    if model_on_cpu:
        return 1
    from crossearth_cli.cpus import available_cpus

    return max(1, min(8, available_cpus() // 2))


def _thread_option(spec: RasterSpec) -> dict:
    compress = spec.compress.lower()
    return {"num_threads": spec.threads} if spec.threads > 1 and compress != "none" else {}


def _creation_options(spec: RasterSpec) -> dict:
    compress = spec.compress.lower()
    opts = {
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": compress,
        "bigtiff": "IF_SAFER",
        "interleave": "band" if spec.count > 1 else "pixel",
        # blocks that are entirely nodata are not written at all (they read back as nodata):
        # a mostly-empty scene gives a small file, written fast
        "sparse_ok": True,
    }
    if compress in ("deflate", "zstd", "lzw"):
        opts["predictor"] = 3 if np.dtype(spec.dtype).kind == "f" else 2
    if compress == "zstd":
        opts["zstd_level"] = 9
    if spec.nbits:
        opts["nbits"] = spec.nbits
    return opts | _thread_option(spec)


@functools.lru_cache(maxsize=1)
def _write_pool() -> ThreadPoolExecutor:
    """The threads every output's writes run on, one write per output in flight at a time.
    Shared, not one per output: a folder of small files would start and join a thread per
    file, each start waiting for the GIL behind the run's other threads."""
    from crossearth_cli.cpus import available_cpus

    return ThreadPoolExecutor(max(2, available_cpus()), thread_name_prefix="crossearth-write")


# a forked child has none of the parent's threads: it starts a pool of its own if it writes
os.register_at_fork(after_in_child=_write_pool.cache_clear)


def _note_blocks(holds_data: np.ndarray, data: np.ndarray, window: Window, nodata) -> None:
    """Mark in ``holds_data`` (bands × block rows × block columns) the blocks where ``data``
    (bands × rows × columns, written at ``window``) has a value other than ``nodata`` (0 when
    None, as GDAL's SPARSE_OK takes it)."""
    empty = 0 if nodata is None else nodata
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    for by in range(r0 // BLOCK, -(-r1 // BLOCK)):
        rows = slice(max(by * BLOCK, r0) - r0, min((by + 1) * BLOCK, r1) - r0)
        for bx in range(c0 // BLOCK, -(-c1 // BLOCK)):
            part = data[:, rows, max(bx * BLOCK, c0) - c0:min((bx + 1) * BLOCK, c1) - c0]
            held = ~np.isnan(part) if np.isnan(empty) else part != empty
            holds_data[:, by, bx] |= held.reshape(len(part), -1).any(axis=1)


class GeoTiffSink:
    """One output raster: written under a temporary name, renamed by :meth:`commit`."""

    def __init__(self, spec: RasterSpec, height: int, width: int, crs, transform, gcps=None,
                 rpcs=None):
        self.spec, self.height, self.width = spec, height, width
        self.final = Path(spec.path)
        self.tmp = _track(temp_path_for(self.final))
        self._pending: list[tuple[int, np.ndarray]] = []
        self._pending_rows = 0
        self._next_row = 0
        self._x0, self._w = 0, width  # the column stripe being written (all of it by default)
        self._columns_done = 0
        self._committed: os.stat_result | None = None  # the final file, once renamed in
        # which blocks hold data (per band; GDAL leaves all-nodata blocks out, SPARSE_OK):
        # after closing, each of them must be on disk (see _check_blocks_on_disk)
        self._holds_data = np.zeros(
            (spec.count, -(-height // BLOCK), -(-width // BLOCK)), dtype=bool)
        # GDAL compresses in a background thread (rasterio releases the GIL), so encoding one
        # block row overlaps the model's work on the next; at most one write is in flight.
        self._writer = _write_pool()
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
            points, gcp_crs = gcps
            # GCPs without a CRS are kept as they are: rasterio writes them only with a CRS
            # object, and an empty one writes none
            profile["gcps"], profile["crs"] = points, gcp_crs if gcp_crs is not None else CRS()
        else:
            profile["crs"] = crs
            profile["transform"] = transform
        if transform is None or transform.is_identity:  # the input had no geotransform (a PNG,
            # a photo, RPCs only): none is written, or GDAL would store the identity, a
            # south-up grid at 0,0 that GIS software draws apart from the input
            profile.pop("transform", None)
        if rpcs is not None:
            profile["rpcs"] = rpcs
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
        except BaseException as exc:  # Ctrl-C / SIGTERM too: the file exists already
            self._cleanup()
            if isinstance(exc, Exception):
                raise_for_os_error(exc, self.final)
            raise

    def start_columns(self, x0: int, x1: int) -> None:
        """Write columns ``x0 .. x1`` next, top to bottom (a stripe of a wide scene)."""
        self._end_columns()
        self._x0, self._w = x0, x1 - x0
        self._next_row = 0

    def _end_columns(self) -> None:
        if self._next_row == 0:
            return
        self._flush()
        if self._next_row != self.height:
            raise RuntimeError(f"only {self._next_row} of {self.height} rows were written")
        self._columns_done += self._w
        self._next_row = 0

    def write_rows(self, y: int, rows: np.ndarray) -> None:
        """Append rows ``y .. y+h`` of the current columns (``rows`` is h×w or bands×h×w);
        rows must come in order."""
        if y != self._next_row:
            raise ValueError(f"rows out of order: expected {self._next_row}, got {y}")
        if rows.ndim == 2:
            rows = rows[None]
        self._pending.append((y, rows))
        self._pending_rows += rows.shape[1]
        self._next_row = y + rows.shape[1]
        if self._pending_rows >= BLOCK or self._next_row == self.height:
            self._flush()

    def _is_blank(self, rows: np.ndarray) -> bool:
        """A broadcast view of the nodata value (the accumulator's rows without data)."""
        if rows.size == 0 or any(st != 0 for st in rows.strides):
            return False
        v, nd = rows.flat[0], self.spec.nodata
        return nd is not None and (v == nd or (np.isnan(nd) and np.isnan(v)))

    def _flush(self) -> None:
        if not self._pending:
            return
        y0 = self._pending[0][0]
        n = self._pending_rows
        # write whole block rows now, keep the remainder for the next call
        full = n if self._next_row == self.height else (n // BLOCK) * BLOCK
        if all(self._is_blank(r) for _, r in self._pending):
            # nothing but nodata: leave the blocks unwritten (SPARSE_OK reads them as nodata)
            first = self._pending[0][1]
            rest = np.broadcast_to(first.flat[0], (first.shape[0], n - full, self._w))
            self._pending = [(y0 + full, rest)] if rest.shape[1] else []
            self._pending_rows = rest.shape[1]
            return
        block = np.concatenate([r for _, r in self._pending], axis=1)
        self._wait()
        data = np.ascontiguousarray(block[:, :full])
        self._inflight = self._writer.submit(
            self._write, data, Window(self._x0, y0, self._w, full)
        )
        rest = block[:, full:]
        self._pending = [(y0 + full, rest)] if rest.shape[1] else []
        self._pending_rows = rest.shape[1]

    def _write(self, data: np.ndarray, window: Window) -> None:
        """One write, on a writer thread: note the blocks it fills, then hand it to GDAL."""
        _note_blocks(self._holds_data, data, window, self.spec.nodata)
        self.ds.write(data, window=window)

    def _check_blocks_on_disk(self, path: Path) -> None:
        """Raise RasterioIOError unless every block that holds data is in the closed file.

        GDAL writes the blocks it still caches when the file is closed, and when its cache
        fills during a later write; rasterio raises for neither if those writes fail. On a
        full disk a small output was renamed into place without its data, and the run
        exited 0. GDAL gives each block's offset and size (``BLOCK_OFFSET_x_y``, TIFF
        metadata); a block that failed has none, or one past the end of the file.
        """
        size = path.stat().st_size
        with rasterio.open(path) as src:  # a directory that failed to be written: raises
            needed = self._holds_data
            if src.count > 1 and src.interleaving is not Interleaving.band:
                needed = needed.any(axis=0, keepdims=True)  # one block for all bands
            for band, by, bx in zip(*np.nonzero(needed)):
                item = f"{bx}_{by}"
                offset = src.get_tag_item(f"BLOCK_OFFSET_{item}", "TIFF", bidx=int(band) + 1)
                length = src.get_tag_item(f"BLOCK_SIZE_{item}", "TIFF", bidx=int(band) + 1)
                if not offset or not length or int(offset) + int(length) > size:
                    raise RasterioIOError(
                        f"Write failed: block {item} of band {band + 1} is not on disk")

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
            self._end_columns()
            self._wait()
            if self._columns_done != self.width:
                raise RuntimeError(f"only {self._columns_done} of {self.width} columns written")
            self.ds.close()
            self._check_blocks_on_disk(self.tmp)
            if self.spec.cog:
                self._to_cog()
                self._check_blocks_on_disk(self.tmp)
            # known before the rename, so that a signal landing just after it still leaves
            # withdraw() able to tell the final file is this sink's (the same inode)
            self._committed = os.stat(self.tmp)
            os.replace(self.tmp, self.final)
            _untrack(self.tmp)
        except BaseException as exc:
            self._cleanup()
            if isinstance(exc, Exception):
                raise_for_os_error(exc, self.final)
            raise
        release_output_lock(self.final)
        return self.final

    @staticmethod
    def commit_together(sinks: list[GeoTiffSink]) -> None:
        """Rename one scene's outputs into place: the others first, the first (its class
        raster) last, so a class raster under its final name means all are done. If any fails
        (a full disk, a signal during a COG conversion), every one already renamed, the one
        being renamed included, is taken back and the rest aborted: a rerun of the same command
        is not refused for outputs that exist."""
        try:
            for sink in sinks[1:] + sinks[:1]:
                sink.commit()
        except BaseException:
            for sink in sinks:
                sink.withdraw()
                sink.abort()
            raise

    def withdraw(self) -> None:
        """Remove the committed output again (another output of its scene failed), if it is
        still the file this sink renamed into place."""
        try:
            if self._committed is not None and os.path.samestat(self._committed,
                                                                os.stat(self.final)):
                self.final.unlink()
        except OSError:
            pass

    def _to_cog(self) -> None:
        cog_tmp = _track(temp_path_for(self.final))
        opts = dict(
            driver="COG",
            compress=self.spec.compress.upper(),
            blocksize=BLOCK,
            overview_resampling=self.spec.overview_resampling.upper(),
            bigtiff="IF_SAFER",
            sparse_ok=True,
        )
        if self.spec.compress.lower() in ("deflate", "zstd", "lzw"):
            opts["predictor"] = "YES"
        opts |= _thread_option(self.spec)
        try:
            rasterio.shutil.copy(self.tmp, cog_tmp, **opts)
        except BaseException:
            cog_tmp.unlink(missing_ok=True)
            _untrack(cog_tmp)
            raise
        os.replace(cog_tmp, self.tmp)
        _untrack(cog_tmp)

    def abort(self) -> None:
        self._cleanup()
        release_output_lock(self.final)

    def _cleanup(self) -> None:
        fut, self._inflight = getattr(self, "_inflight", None), None
        if fut is not None and not fut.cancel():
            wait([fut])  # a write still running: let it end before the file goes
        ds = getattr(self, "ds", None)
        if ds is not None and not ds.closed:
            try:
                ds.close()
            except Exception:  # noqa: BLE001 - already failing; just release the handle
                pass
        self.tmp.unlink(missing_ok=True)
        _untrack(self.tmp)


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


def class_names_in(tags: dict[str, str]) -> list[str] | None:
    """Class names in a raster's tags, as :func:`class_tags` stores them, or None."""
    if "classes" in tags:
        try:
            return list(json.loads(tags["classes"]))
        except (ValueError, TypeError):
            return None
    return None
