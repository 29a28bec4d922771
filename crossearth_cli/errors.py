"""Errors a user can cause, and how they reach the console.

Library code raises these; the CLI turns each into one line on stderr and an exit code, with no
traceback unless ``--debug`` is given. Anything else is a bug and may crash loudly.
"""

from __future__ import annotations

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
        if self.path and self.path not in msg:
            msg = f"{self.path}: {msg}"
        if self.hint:
            msg = f"{msg} ({self.hint})"
        return " ".join(msg.split())


class InputError(UserError):
    """An input raster or vector that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely or does not match the model."""


class OutputError(UserError):
    """An output that cannot be written (exists, unwritable folder, no space)."""


class ConfigError(UserError):
    """Options that contradict each other or are out of range."""
