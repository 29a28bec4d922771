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


def one_log() -> bool:
    """Whether stdout and stderr go to the same place (``> run.log 2>&1``, a terminal): what
    the notes said as it happened then need not be repeated in the results."""
    import os

    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind one of them
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def note(message: str, style: str = "yellow") -> None:
    """One line on stderr: a warning or a choice the tool made for the user. URLs lose their
    query strings (a signed URL's signature)."""
    from rich.text import Text

    from crossearth_cli.raster.remote import hide_queries

    message = hide_queries(message)
    _err.print(Text.assemble(("note:", style), " ", message) if style else message)


# a run whose stderr is not a terminal (a log file, nohup, a scheduler) gets a plain progress
# line at most this often instead of a bar; CROSSEARTH_PROGRESS_SECONDS sets it, 0 turns it off
PROGRESS_SECONDS = 60.0


class LogProgress:
    """Progress for logs: one ``progress:`` line per interval, not a bar that redraws."""

    def __init__(self, clock=None):
        import os
        import time

        self.clock = clock or time.monotonic
        try:
            self.every = float(os.environ.get("CROSSEARTH_PROGRESS_SECONDS", PROGRESS_SECONDS))
        except ValueError:
            self.every = PROGRESS_SECONDS
        self.on = self.every > 0 and not sys.stderr.isatty()
        self.start = self.last = self.clock()

    def due(self) -> bool:
        now = self.clock()
        if not self.on or now - self.last < self.every:
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return self.clock() - self.start

    @staticmethod
    def say(text: str) -> None:
        from crossearth_cli.raster.remote import hide_queries

        _err.print(f"progress: {hide_queries(text)}")


def duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``3 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


def tiles_line(label: str, done: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    left = f", about {duration((total - done) / rate)} left" if rate and done < total else ""
    return (f"{label}: {done:,}/{total:,} tiles ({100 * done / max(total, 1):.0f} %), "
            f"{rate:.1f} tiles/s{left}")


@contextmanager
def progress_events(label: str) -> Iterator:
    """A progress bar (tiles, tiles/s, ETA) fed by engine events on a terminal; elsewhere a
    ``progress:`` line every minute (:class:`LogProgress`)."""
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
    log = LogProgress()
    count = {"done": 0, "total": 0}

    def events(kind: str, data: dict) -> None:
        nonlocal task
        if kind == "start":
            task = progress.add_task(label, total=data["tiles"], rate="")
            count.update(done=0, total=data["tiles"])
            log.start = log.last = log.clock()
        elif kind == "advance" and task is not None:
            progress.advance(task, data["tiles"])
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f}/s" if speed else "")
            count["done"] += data["tiles"]
            if count["done"] < count["total"]:
                if log.due():
                    log.say(tiles_line(label, count["done"], count["total"], log.elapsed()))
            elif log.on and log.elapsed() >= log.every:
                # a long run's outputs may take a while yet (overviews, vectors): say so
                log.say(f"{label}: all {count['total']:,} tiles done in "
                        f"{duration(log.elapsed())}; finishing the outputs")
        elif kind == "note":
            note(data["message"])

    with progress:
        yield events
