"""Errors a user can cause, and how they reach the console.

Library code raises these; the CLI turns each into one line on stderr and an exit code, with no
traceback unless ``--debug`` is given. Anything else is a bug and may crash loudly.
"""

from __future__ import annotations

import re
from pathlib import Path

EXIT_USAGE = 2
EXIT_PARTIAL = 1


class UserError(Exception):
    """A problem with what the user gave us: one line naming the file and the fix."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(message)

    def one_line(self) -> str:
        msg = str(self)
        if self.path and not _mentions(msg, self.path):
            msg = f"{self.path}: {msg}"
        if self.hint:
            msg = f"{msg} ({self.hint})"
        return " ".join(msg.split())


def _mentions(msg: str, path: str) -> bool:
    """``path`` appears in ``msg`` as a name of its own (not inside a word: "ck" is not
    named by "checkpoint")."""
    edge = r"""[\s'"(),:]"""
    return re.search(rf"(^|{edge}){re.escape(path)}($|{edge})", msg) is not None


class InputError(UserError):
    """An input raster or vector that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely or does not match the model."""


class OutputError(UserError):
    """An output that cannot be written (exists, unwritable folder, no space)."""


class ConfigError(UserError):
    """Options that contradict each other or are out of range."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class Interrupted(KeyboardInterrupt):
    """Stop requested by a signal (Ctrl-C: SIGINT; ``kill``, schedulers: SIGTERM).

    A KeyboardInterrupt, so every ``except Exception`` lets it through and every clean-up that
    already handles Ctrl-C (temporary outputs, reader threads) handles SIGTERM the same way.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        try:
            self.signal_name = signal.Signals(self.signum).name
        except ValueError:
            self.signal_name = f"signal {self.signum}"
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def gdal_words(exc: BaseException | str, *names: str) -> str:
    """The first line of GDAL's message, without the file's own name in quotes (``'x.tif' not
    recognized as being in a supported file format.`` → ``not recognized as being in a
    supported file format``): our line starts with the name already."""
    text = (without_names(str(exc), *names).strip().splitlines() or [type(exc).__name__])[0]
    return text.strip().rstrip(".") or "unreadable"


def without_names(text: str, *names: str) -> str:
    """``text`` without the ``names`` GDAL puts in its messages: quoted (``'x.tif' not
    recognized``), or the file name libtiff starts a line with (``x.tif: TIFFReadDirectory``)."""
    for name in map(str, names):
        text = re.sub(rf"[`']{re.escape(name)}'\s*", "", text)
        base = name.rstrip("/").rsplit("/", 1)[-1]
        text = re.sub(rf"(?m)^(?:{re.escape(name)}|{re.escape(base)}): ", "", text)
    return text


def from_os_error(exc: BaseException) -> UserError | None:
    """A user-facing error for OS failures that are never bugs (disk full, quota, read-only
    file system, permission denied), or None. Used by the CLI as a last resort, so a full disk
    hit anywhere (a manifest, a GeoPackage, a summary) is one clear line, not a traceback."""
    import errno

    if not isinstance(exc, OSError):
        return None
    path = exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return OutputError(f"{what} while writing", path=path, hint="free some space")
    if exc.errno == errno.EROFS:
        return OutputError("cannot write: read-only file system", path=path,
                           hint="choose another output folder")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"permission denied ({exc.strerror})", path=path,
                         hint="check the permissions or choose another path")
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failure: the case the batch halving handles."""
    import torch  # here, not at import time: the CLI loads this module before torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or looks_out_of_memory(exc)


def looks_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure by its type or words, without importing torch: numpy's
    MemoryError, torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"), CUDA's
    "out of memory", and oneDNN's "could not create a primitive" (a CPU convolution whose
    workspace could not be allocated: seen under a memory limit, where a smaller batch ran;
    its "... primitive descriptor" is an unsupported shape, not memory)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or \
        "can't allocate memory" in text or (
            "could not create a primitive" in text and "descriptor" not in text)
