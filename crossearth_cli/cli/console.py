"""Console output for the CLI: notes on stderr, results on stdout, a rich progress bar.

Library code never prints; it reports through the ``events(kind, data)`` callback built here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

# no markup: file names are printed as they are ("scene[red].tif" is a name, not a style)
_err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
_out = Console(highlight=False, soft_wrap=True, markup=False)


def err_console() -> Console:
    return _err


def out_console() -> Console:
    return _out


def note(message: str, style: str = "yellow") -> None:
    """One line on stderr: a warning or a choice the tool made for the user. URLs lose their
    query strings (a signed URL's signature)."""
    from rich.text import Text

    from crossearth_cli.raster.remote import hide_queries

    message = hide_queries(message)
    _err.print(Text.assemble(("note:", style), " ", message) if style else message)


@contextmanager
def progress_events(label: str) -> Iterator:
    """A progress bar (tiles, tiles/s, ETA) fed by engine events; silent when not a TTY."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tiles"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
        disable=not sys.stderr.isatty(),
    )
    task = None

    def events(kind: str, data: dict) -> None:
        nonlocal task
        if kind == "start":
            task = progress.add_task(label, total=data["tiles"], rate="")
        elif kind == "advance" and task is not None:
            progress.advance(task, data["tiles"])
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f}/s" if speed else "")
        elif kind == "note":
            note(data["message"])

    with progress:
        yield events
