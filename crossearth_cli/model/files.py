"""Atomic output files: written under a temporary name in the same folder, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from crossearth_cli.errors import OutputError

__all__ = ["atomic_write", "check_destination"]


def check_destination(dst: str | Path, overwrite: bool) -> Path:
    """Fail before any slow work on a destination that cannot take a new file."""
    dst = Path(dst)
    if dst.is_dir():
        raise OutputError("is a folder, expected a file name", path=dst)
    if dst.exists() and not overwrite:
        raise OutputError("already exists", path=dst, hint="pass --overwrite to replace it")
    folder = dst.parent if str(dst.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder", path=dst,
                          hint="choose another path")
    # a missing folder is made when the file is written (as segment and vectorize make
    # theirs), unless part of its path is a file
    above = next((p for p in folder.parents if p.exists()), Path("."))
    if not folder.exists() and not above.is_dir():
        raise OutputError(f"{above} is a file, not a folder", path=dst,
                          hint="choose another path")
    return dst


def _new_file_mode() -> int:
    """The mode a new file gets here (0666 less the umask), as ``open`` would give it."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(dst: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``dst`` only if it succeeded.

    A crash or Ctrl-C leaves no file that looks complete (only a removed temporary).
    Refuses to replace an existing ``dst`` unless ``overwrite``.
    """
    dst = check_destination(dst, overwrite)
    folder = dst.parent if str(dst.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror}", path=dst) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp's 0600 would leave colleagues locked out
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            from crossearth_cli.raster.writer import raise_if_disk_full

            # safetensors and torch wrap the OS error in their own exceptions
            raise_if_disk_full(exc, dst, failed_write=True)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write: {exc.strerror or exc}", path=dst) from exc
        raise
    return dst
