"""Folders of scenes: input expansion, a resumable manifest, and splitting work across ranks.

A run over many inputs writes ``<stem>_classes.tif`` (and the other outputs asked for) under
OUTDIR, mirroring sub-folders. After each scene's outputs are renamed into place, one JSON line
is appended to a manifest beside them, recording the input's size and mtime, a hash of every
setting that changes results, and the size and mtime of each output. A rerun skips an input
only when its last record says ``done`` and all of that still holds; the existence of a file
is not enough.

Under ``torchrun`` each rank appends to its own manifest file (no two processes ever write one
file) and takes a deterministic share of the inputs, balanced by file size.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crossearth_cli.errors import ConfigError, InputError

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
MANIFEST_PREFIX = "crossearth-manifest"
REMOTE_READ_AHEAD = 8  # files on a server opened side by side (round trips, not bandwidth)
OUTPUT_SUFFIXES = {
    "classes": "_classes.tif",
    "confidence": "_confidence.tif",
    "probabilities": "_probabilities.tif",
    "vector": ".gpkg",
}


@dataclass(frozen=True)
class BatchInput:
    path: Path | str  # as found; a URL stays the text given (see raster.remote)
    rel: Path  # below its folder (a listed URL's: its remote folder's), mirrored under OUTDIR

    @property
    def remote(self) -> bool:
        return isinstance(self.path, str)

    def outputs(self, outdir: Path, kinds: Iterable[str]) -> dict[str, Path]:
        base = outdir / self.rel.parent / self.rel.stem
        return {k: base.with_name(base.name + OUTPUT_SUFFIXES[k]) for k in kinds}


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_glob(arg: str) -> bool:
    """A pattern, unless a file or folder of that very name exists ("scene[1].tif" is a name)."""
    return _has_magic(arg) and not os.path.lexists(arg)


def _split_glob(pattern: str) -> tuple[Path, str]:
    """(the folder a pattern starts from, the pattern to match there, its leading names
    escaped). A leading name that exists as typed ("data[2024]") is a folder, not a pattern."""
    parts = Path(pattern).parts
    root: list[str] = []
    for part in parts:
        if _has_magic(part) and not os.path.lexists(os.path.join(*root, part)):
            break
        root.append(part)
    rest = os.path.join(*parts[len(root):])  # never empty: the whole name does not exist
    if not root:
        return Path("."), rest
    return Path(*root), os.path.join(glob.escape(os.path.join(*root)), rest)


def _walk_rasters(folder: Path) -> list[Path]:
    """Every raster under ``folder``. Symlinked folders are not followed (no loops)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(RASTER_SUFFIXES) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return found


@dataclass
class Listing:
    """What :func:`expand_inputs` set aside, for the run's notes."""

    ours: list[Path] = field(default_factory=list)  # outputs of earlier runs, found in folders
    links: list[tuple[Path, Path]] = field(default_factory=list)  # (a link, the file run)


# names crossearth gives the rasters it writes (and VRT mosaics, named by the user)
_OUR_RASTER_NAMES = tuple(v for k, v in OUTPUT_SUFFIXES.items() if k != "vector") + (".vrt",)


def written_by_crossearth(path: Path) -> bool:
    """An output of an earlier run: a raster named as crossearth names its outputs that
    carries its class names (or a VRT over such rasters). Only such names are opened: a
    check of every file of a large folder would cost a read each."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    from crossearth_cli.raster.writer import class_names_in

    if not path.name.lower().endswith(_OUR_RASTER_NAMES):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if class_names_in(ds.tags()) is not None:
                    return True
    except Exception:  # noqa: BLE001 - unreadable: the run says so, as for any input
        return False
    return path.suffix.lower() == ".vrt" and _mosaic_of_class_rasters(path)


def _mosaic_of_class_rasters(vrt: Path) -> bool:
    """A VRT whose every source is a ``*_classes.tif`` (the mosaics of earlier versions,
    written without the class names)."""
    import re

    try:
        text = vrt.read_text(errors="replace")
    except OSError:
        return False
    sources = re.findall(r"<SourceFilename[^>]*>([^<]*)</SourceFilename>", text)
    return bool(sources) and all(s.endswith(OUTPUT_SUFFIXES["classes"]) for s in sources)


def expand_inputs(args: list[str], exclude: Path | None = None,
                  listing: Listing | None = None) -> list[BatchInput]:
    """Files, folders, globs and URLs → unique inputs in a stable order, with mirrored paths.

    A URL is taken as it is (whether it answers is found when it runs, so one missing file
    on a server fails alone), and named by its file name, as a file is; a remote folder (a URL
    ending in ``/``) is listed, and its rasters mirror their paths below it, as a local
    folder's do. Folders and patterns leave out the outputs of earlier runs found in them;
    a symbolic link to a file also found is run once, as that file. ``listing`` collects
    both, for the run's notes."""
    from crossearth_cli.raster.remote import file_name, is_folder, is_remote, list_folder

    items: list[BatchInput] = []
    seen: dict[str, int] = {}  # resolved path -> index in items
    excl = exclude.resolve() if exclude is not None else None
    listing = listing if listing is not None else Listing()

    def add(path: Path, root: Path, found: bool = False) -> None:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling link or a symlink loop
            real = path.absolute()
        if excl is not None and (real == excl or excl in real.parents):
            return  # never treat our own outputs as inputs
        if found and written_by_crossearth(path):
            listing.ours.append(path)
            return
        try:
            rel = path.relative_to(root)
        except ValueError:
            rel = Path(path.name)
        key = str(real)
        if key in seen:  # the same file again (a link to it, or given twice): run once
            first = items[seen[key]]
            if first.path != path and first.path.is_symlink() and not path.is_symlink():
                items[seen[key]] = BatchInput(path=path, rel=rel)  # the file, not its link
                listing.links.append((first.path, path))
            elif first.path != path and path.is_symlink():
                listing.links.append((path, first.path))
            return
        seen[key] = len(items)
        items.append(BatchInput(path=path, rel=rel))

    def add_url(url: str, rel: str) -> None:
        key = url.split("?", 1)[0]  # one object, however often (re-)signed: once
        if key not in seen:
            seen[key] = len(items)
            items.append(BatchInput(path=url, rel=Path(rel)))

    for arg in args:
        p = Path(arg)
        if is_folder(arg):
            for url, rel in list_folder(arg, RASTER_SUFFIXES):
                add_url(url, rel)
        elif is_remote(arg):  # a signed URL's query may hold glob characters: not a pattern
            add_url(arg, file_name(arg))
        elif _is_glob(arg):
            root, pattern = _split_glob(arg)
            matches = sorted(glob.glob(pattern, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise InputError("matches no files", path=arg, hint="check the pattern")
            for f in files:
                add(f, root, found=True)
        elif p.is_dir():
            files = _walk_rasters(p)
            if not files:
                raise InputError(
                    "holds no rasters (.tif, .tiff, .vrt, .jp2, .img)", path=p
                )
            for f in files:
                add(f, p, found=True)
        elif p.exists():
            add(p, p.parent)
        else:  # a name typed by hand: fail before any work, not after the others are done
            raise InputError("no such file", path=p, hint="check the path")
    return items


def check_output_names(items: list[BatchInput], outdir: Path) -> None:
    seen: dict[Path, BatchInput] = {}
    for it in items:
        out = it.outputs(outdir, ["classes"])["classes"]
        if out in seen:
            hint = "rename one of them or process them separately"
            folder = shared_folder(seen[out].path, it.path) if it.remote else None
            if folder and seen[out].remote:
                hint = f"give the folder they share, {folder} (its sub-folders are mirrored)"
            raise ConfigError(f"{seen[out].path} and {it.path} would both write {out}",
                              hint=hint)
        seen[out] = it


def shared_folder(a: str, b: str) -> str | None:
    """The deepest folder URL holding both URLs (``…/t/2024/x.tif``, ``…/t/2025/x.tif`` →
    ``…/t/``); None when they share no server (``https://host``, ``/vsis3/bucket``)."""
    a_parts, b_parts = a.split("?", 1)[0].split("/")[:-1], b.split("?", 1)[0].split("/")[:-1]
    n = 0
    while n < min(len(a_parts), len(b_parts)) and a_parts[n] == b_parts[n]:
        n += 1
    return "/".join(a_parts[:n]) + "/" if n >= 3 else None


def settings_hash(values: dict) -> str:
    """Hash of everything that changes the numbers in the outputs."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Record:
    input: str
    status: str  # "done" | "failed"
    settings: str
    size: int | None = None
    mtime_ns: int | None = None
    fingerprint: str | None = None  # a URL's (raster.reader.remote_fingerprint), not a file's
    outputs: dict[str, dict] = field(default_factory=dict)  # kind -> {"path", "size"}
    reason: str | None = None
    pixels: int = 0
    seconds: float = 0.0
    rank: int = 0
    finished: float = 0.0
    window: list[int] | None = None  # with --aoi: col_off, row_off, width, height
    # the settings of its rasters alone, when it also has a GeoPackage (made from them): a
    # rerun that changes or adds only the vector output makes only that
    raster_settings: str | None = None


class Manifest:
    """JSON-lines records beside the outputs; one file per writer (host, rank)."""

    def __init__(self, outdir: Path, rank: int = 0, world: int = 1):
        self.outdir = outdir
        self.path = self.path_for(outdir, rank, world)
        self.rank = rank
        self.records: dict[str, Record] = {}
        self._fingerprints: dict[str, str] = {}  # URL -> fingerprint, once per run
        self._load()

    @staticmethod
    def path_for(outdir: Path, rank: int = 0, world: int = 1) -> Path:
        """The manifest one writer keeps: the folder's own for a single run."""
        name = f"{MANIFEST_PREFIX}.jsonl" if world == 1 else (
            f"{MANIFEST_PREFIX}.{socket.gethostname()}.rank{rank}.jsonl"
        )
        return outdir / name

    def files(self) -> list[Path]:
        return sorted(self.outdir.glob(f"{MANIFEST_PREFIX}*.jsonl"))

    def read_all(self) -> list[Record]:
        """Every record in every manifest file of the folder (all ranks, all runs)."""
        records = []
        for f in self.files():
            try:
                lines = f.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    records.append(Record(**json.loads(line)))
                except (ValueError, TypeError):
                    continue  # a line cut short by a kill: ignore it
        return records

    def _load(self) -> None:
        for rec in self.read_all():
            old = self.records.get(rec.input)
            if old is None or rec.finished >= old.finished:
                self.records[rec.input] = rec

    def key(self, item: BatchInput) -> str:
        return item.rel.as_posix()

    def identity(self, item: BatchInput) -> dict:
        """What tells a rerun that an input is the one its outputs came from: a file's size
        and time, a URL's fingerprint (read over the network once per run, then kept)."""
        if not item.remote:
            st = item.path.stat()
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "fingerprint": None}
        found = self._fingerprints.get(item.path)
        if found is None:
            from crossearth_cli.raster.reader import remote_fingerprint

            found = self._fingerprints[item.path] = remote_fingerprint(item.path)
        return {"size": None, "mtime_ns": None, "fingerprint": found}

    def finished_before(self, items: list[BatchInput], settings: str,
                        raster_settings: str | None = None) -> list[BatchInput]:
        """The inputs with a record of a finished run under these settings, or whose rasters
        were made under ``raster_settings`` (worth checking)."""
        wanted = {settings, raster_settings} - {None}

        def done(it: BatchInput) -> bool:
            rec = self.records.get(self.key(it))
            return rec is not None and rec.status == "done" and bool(
                {rec.settings, rec.raster_settings} & wanted)

        return [it for it in items if done(it)]

    def fetch_fingerprints(self, items: list[BatchInput], threads: int = 8) -> None:
        """The fingerprints of the URLs among ``items``, several requests at a time (a rerun
        over thousands of URLs waits for the server's latency, not for its bandwidth).
        Failures are left for the run, which reports them."""
        from concurrent.futures import ThreadPoolExecutor

        def fetch(it: BatchInput) -> None:
            try:
                self.identity(it)
            except Exception:  # noqa: BLE001 - such an input fails when it runs, named
                pass

        urls = [it for it in items if it.remote and it.path not in self._fingerprints]
        if urls:
            with ThreadPoolExecutor(min(threads, len(urls))) as pool:
                list(pool.map(fetch, urls))

    def is_current(self, item: BatchInput, settings: str, outputs: dict[str, Path]) -> bool:
        rec = self.records.get(self.key(item))
        if rec is None or rec.status != "done" or rec.settings != settings:
            return False
        return set(rec.outputs) == set(outputs) and self._unchanged(rec, item, outputs)

    def rasters_current(self, item: BatchInput, raster_settings: str,
                        outputs: dict[str, Path]) -> bool:
        """Its rasters (``outputs``, the GeoPackage left out) are current under
        ``raster_settings``, though the whole record is not: only the GeoPackage is to be made,
        from them."""
        rec = self.records.get(self.key(item))
        if rec is None or rec.status != "done" or raster_settings not in (
                rec.settings, rec.raster_settings):
            return False
        rasters = {kind for kind in rec.outputs if kind != "vector"}
        return rasters == set(outputs) and self._unchanged(rec, item, outputs)

    def made_with_more(self, item: BatchInput, kinds: list[str], key_for) -> bool:
        """An earlier run made ``kinds`` of this input and more outputs besides, under the
        settings these give: ``key_for(kinds)`` is the resume key of the settings now for
        ``kinds`` (the record's rasters alone are compared too, so dropping --vector matches
        whatever its options were)."""
        rec = self.records.get(self.key(item))
        if rec is None or rec.status != "done" or not set(kinds) < set(rec.outputs):
            return False
        made = [k for k in OUTPUT_SUFFIXES if k in rec.outputs]  # in the runs' own order
        if key_for(made) == rec.settings:
            return True
        rasters = [k for k in made if k != "vector"]
        return ("vector" not in kinds and rec.raster_settings is not None
                and set(kinds) <= set(rasters) and key_for(rasters) == rec.raster_settings)

    def current_with_more(self, item: BatchInput, kinds: list[str], key_for,
                          outputs: dict[str, Path]) -> bool:
        """:meth:`made_with_more`, and the input and ``outputs`` are as that run left them: a
        rerun that asks for fewer outputs has nothing to do for this input."""
        return self.made_with_more(item, kinds, key_for) and self._unchanged(
            self.records[self.key(item)], item, outputs)

    def _unchanged(self, rec: Record, item: BatchInput, outputs: dict[str, Path]) -> bool:
        """The input is the one ``rec`` was made from, and ``outputs`` are as it left them."""
        try:
            now = self.identity(item)
        except Exception:  # noqa: BLE001 - gone or unreadable: it runs, and fails named
            return False
        if (now["size"], now["mtime_ns"], now["fingerprint"]) != (
                rec.size, rec.mtime_ns, rec.fingerprint):
            return False
        for kind, path in outputs.items():
            made = rec.outputs[kind]
            try:
                st = path.stat()
            except OSError:
                return False
            # replaced since (by another run, or edited in place): its time tells, even at
            # the same size; records of earlier versions hold the size alone
            if st.st_size != made["size"] or made.get("mtime_ns", st.st_mtime_ns) != \
                    st.st_mtime_ns:
                return False
        return True

    def append(self, rec: Record) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        rec.finished = time.time()
        rec.rank = self.rank
        line = json.dumps(asdict(rec), sort_keys=True) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk's ENOSPC names no file: this one is ours
            from crossearth_cli.raster.writer import raise_for_os_error

            raise_for_os_error(exc, self.path)
            raise
        self.records[rec.input] = rec

    def done_record(self, item: BatchInput, settings: str, outputs: dict[str, Path],
                    pixels: int, seconds: float, window=None,
                    raster_settings: str | None = None) -> Record:
        return Record(
            input=self.key(item), status="done", settings=settings, **self.identity(item),
            pixels=pixels, seconds=round(seconds, 3),
            window=list(window) if window is not None else None,
            raster_settings=raster_settings,
            outputs={k: _output_record(p, self.outdir) for k, p in outputs.items()},
        )

    def failed_record(self, item: BatchInput, settings: str, reason: str) -> Record:
        return Record(input=self.key(item), status="failed", settings=settings, reason=reason)


def _output_record(path: Path, outdir: Path) -> dict:
    st = path.stat()
    return {"path": str(path.relative_to(outdir)), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def split_for_rank(items: list[BatchInput], rank: int, world: int) -> list[BatchInput]:
    """Deterministic share of ``items`` for ``rank``: largest first to the least-loaded rank."""
    if world <= 1:
        return list(items)

    def size(it: BatchInput) -> int:
        if it.remote:  # no size without a request per URL: balanced by count
            return 0
        try:
            return it.path.stat().st_size
        except OSError:
            return 0

    order = sorted(range(len(items)), key=lambda i: (-size(items[i]), items[i].rel.as_posix()))
    load = [0] * world
    mine = []
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += max(size(items[i]), 1)
        if r == rank:
            mine.append(i)
    return [items[i] for i in sorted(mine)]


@dataclass
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> RankInfo:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            world=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
        )


@dataclass
class BatchResult:
    done: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[Record] = field(default_factory=list)
    seconds: float = 0.0
    # done files whose GeoPackage alone was made, from rasters of an earlier run (no model),
    # and the seconds that took (of ``seconds``; not the model's, so not in Mpx/s)
    vectors_only: list[str] = field(default_factory=list)
    vectors_only_seconds: float = 0.0
    # what users must know of some outputs (no CRS, guessed bands) → the files concerned
    notes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def pixels(self) -> int:
        """Pixels the model segmented in this run (not those only vectorized)."""
        made = set(self.vectors_only)
        return sum(r.pixels for r in self.done if r.input not in made)

    @property
    def mpx_per_s(self) -> float:
        return self.pixels / 1e6 / max(self.seconds - self.vectors_only_seconds, 1e-9)

    def merge(self, other: BatchResult) -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed
        self.vectors_only += other.vectors_only
        self.vectors_only_seconds = max(self.vectors_only_seconds, other.vectors_only_seconds)
        for message, names in other.notes.items():
            self.notes.setdefault(message, []).extend(names)
        self.seconds = max(self.seconds, other.seconds)

    def as_dict(self) -> dict:
        windows = {r.input: dict(zip(("col_off", "row_off", "width", "height"), r.window))
                   for r in self.done if r.window is not None}
        return {
            "files_done": len(self.done),
            "files_skipped": len(self.skipped),
            "files_failed": len(self.failed),
            "files_vectors_only": len(self.vectors_only),
            "pixels": self.pixels,
            "seconds": round(self.seconds, 3),
            "mpx_per_s": round(self.mpx_per_s, 4),
            "done": [r.input for r in self.done],
            "skipped": list(self.skipped),
            "failed": [{"input": r.input, "reason": r.reason} for r in self.failed],
            "vectors_only": list(self.vectors_only),
            **({"notes": self.notes} if self.notes else {}),
            **({"windows": windows} if windows else {}),
        }


def results_since(records: list[Record], since: float, keys: set[str]) -> BatchResult:
    """What was finished of ``keys`` since ``since``, from manifest records (every rank's):
    how far a stopped torchrun job got, as rank 0 reads it. A file's latest record counts."""
    latest: dict[str, Record] = {}
    for rec in records:
        if rec.input in keys and rec.finished >= since and (
                rec.input not in latest or rec.finished >= latest[rec.input].finished):
            latest[rec.input] = rec
    result = BatchResult()
    for rec in sorted(latest.values(), key=lambda r: r.finished):
        (result.done if rec.status == "done" else result.failed).append(rec)
    return result


def _reason(exc: BaseException) -> str:
    """Why a file failed, for the console, the manifest and ``--summary``: URLs without their
    query strings (a signed URL's signature would be kept in files and logs)."""
    from crossearth_cli.errors import UserError
    from crossearth_cli.raster.remote import hide_queries

    if isinstance(exc, UserError):
        return hide_queries(exc.one_line())
    text = hide_queries(" ".join(str(exc).split()) or type(exc).__name__)
    return f"internal error ({type(exc).__name__}: {text}); please report it with --debug"


def run_batch(
    items: list[BatchInput],
    outdir: Path,
    template,
    session,
    kinds: list[str],
    result_key: str,
    manifest: Manifest,
    after_scene=None,
    events=None,
    result: BatchResult | None = None,
    raster_key: str | None = None,
) -> BatchResult:
    """Segment ``items`` with one loaded model. Failures are recorded and the run goes on.

    The next scene is opened and its first tiles read while the current one runs. Scenes too
    small to fill a batch on their own (a folder of 512² crops: one tile each) share forward
    passes with the scenes after them (``Session.run_group``), up to the batch size; then
    the next files are read ahead, up to a batch of them (only small scenes' pixels are read
    ahead, so a big scene waiting its turn costs an open file, not a strip of rows). Files on a
    server are opened :data:`REMOTE_READ_AHEAD` at a time, so that their round trips (a
    header, a fingerprint, the first rows: each a request) overlap instead of adding up.

    ``result`` (filled as files finish, and returned) lets a caller that is interrupted
    report what was done by then. With ``raster_key`` (the settings of the rasters alone), a
    scene's rasters are recorded under it before its GeoPackage is made, so that a stop while
    vectorizing costs a rerun only the GeoPackage."""
    import dataclasses
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    emit = events or (lambda kind, data: None)
    result = result if result is not None else BatchResult()
    t0 = time.perf_counter()
    todo: list[tuple[BatchInput, dict[str, Path]]] = []
    for it in items:
        outs = it.outputs(outdir, kinds)
        if not template.overwrite and manifest.is_current(it, result_key, outs):
            result.skipped.append(manifest.key(it))
            emit("file_skipped", {"input": manifest.key(it)})
        else:
            todo.append((it, outs))
    emit("batch_start", {"files": len(todo), "skipped": len(result.skipped)})

    def settings_for(it: BatchInput, outs: dict[str, Path]):
        return dataclasses.replace(
            template, input=it.path, output=outs["classes"], confidence=outs.get("confidence"),
            probabilities=outs.get("probabilities"), overwrite=True,
        )

    def prepare(i: int, prime: bool):
        it, outs = todo[i]
        if it.remote:  # the URL's fingerprint as it is before its pixels are read
            manifest.identity(it)
        scene = session.prepare(settings_for(it, outs), prime=False)
        try:
            if prime or session.group_key(scene) is not None:
                scene.feed.prime()
        except BaseException:
            scene.close()
            raise
        return scene

    def record(i: int, res, seconds: float) -> None:
        """A finished scene: the after-scene step (vectors), then its manifest record."""
        it, outs = todo[i]
        try:
            if raster_key is not None and "vector" in outs:
                rasters = {kind: p for kind, p in outs.items() if kind != "vector"}
                manifest.append(manifest.done_record(it, raster_key, rasters, res.pixels,
                                                     seconds, window=res.window,
                                                     raster_settings=raster_key))
            if after_scene is not None:
                after_scene(res, outs)
            rec = manifest.done_record(it, result_key, outs, res.pixels, seconds,
                                       window=res.window, raster_settings=raster_key)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            _fail(manifest, result, it, result_key, exc, emit)
            return
        manifest.append(rec)
        result.done.append(rec)
        emit("file_done", {"input": manifest.key(it), "pixels": res.pixels,
                           "seconds": res.seconds})

    pending: deque = deque()  # (index, future of its prepared scene), in order
    submitted = 0
    taken: list = []  # (index, scene) taken from the queue, not yet in a group or run
    group: list = []  # (index, scene) to run together

    depth = REMOTE_READ_AHEAD if any(it.remote for it, _ in todo) else 1
    with ThreadPoolExecutor(depth, thread_name_prefix="crossearth-next") as ahead:

        def read_ahead(n: int) -> None:
            nonlocal submitted
            while len(pending) < max(n, depth) and submitted < len(todo):
                # the very next scene is read at once; later ones only if they are small
                pending.append((submitted, ahead.submit(prepare, submitted, not pending)))
                submitted += 1

        def take() -> bool:
            """Move the next prepared scene to ``taken``; False if it failed (recorded)."""
            i, fut = pending.popleft()
            read_ahead(1)
            emit("file_start", {"input": manifest.key(todo[i][0]), "index": i,
                                "total": len(todo), "path": str(todo[i][0].path)})
            try:
                taken.append((i, fut.result()))
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                _fail(manifest, result, todo[i][0], result_key, exc, emit)
                return False
            return True

        read_ahead(1)
        try:
            while taken or pending:
                if not taken and not take():
                    continue
                i, scene = taken[0]
                key = session.group_key(scene)
                if key is None:  # alone, with the next scene read meanwhile
                    taken.pop(0)
                    try:
                        t1 = time.perf_counter()
                        res = session.run(scene, events=emit)
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        _fail(manifest, result, todo[i][0], result_key, exc, emit)
                        continue
                    record(i, res, time.perf_counter() - t1)
                    continue
                cap = session.predictor.batch_size
                group[:] = [taken.pop(0)]
                tiles = scene.tile_count
                while tiles < cap:
                    read_ahead(cap)
                    if not pending:
                        break
                    if not take():
                        continue
                    other = taken[-1][1]
                    if session.group_key(other) != key or tiles + other.tile_count > cap:
                        break  # it stays taken: the next round starts with it
                    group.append(taken.pop())
                    tiles += other.tile_count
                read_ahead(cap)  # the next files are read while this group runs
                outcomes = session.run_group([s for _, s in group], events=emit)
                for (j, _), res in zip(group, outcomes):
                    if isinstance(res, Exception):
                        _fail(manifest, result, todo[j][0], result_key, res, emit)
                    else:
                        record(j, res, res.seconds)
        except KeyboardInterrupt:
            for _, scene in taken + group:  # closing a closed scene does nothing
                scene.close()
            for _, fut in pending:
                fut.cancel()
                _close_quietly(fut)
            result.seconds += time.perf_counter() - t0
            raise
    result.seconds += time.perf_counter() - t0
    return result


def _close_quietly(fut) -> None:
    try:
        scene = fut.result(timeout=30)
        scene.close()
    except Exception:  # noqa: BLE001 - only releasing resources on the way out
        pass


def _fail(manifest: Manifest, result: BatchResult, it: BatchInput, key: str,
          exc: BaseException, emit) -> None:
    rec = manifest.failed_record(it, key, _reason(exc))
    manifest.append(rec)
    result.failed.append(rec)
    emit("file_failed", {"input": rec.input, "reason": rec.reason})
