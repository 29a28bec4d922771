"""Command-line entry point: ``crossearth``.

Each command lives in its own module and registers itself on :data:`app`. This module owns the
way a run ends: user errors become one line on stderr and exit code 2 (``--debug`` adds the
traceback), Ctrl-C (SIGINT) and SIGTERM remove temporary outputs and exit 130 / 143 with one
line, and output locks are released.

The Typer app runs with ``standalone_mode=False``: in standalone mode click (and Typer) catch
KeyboardInterrupt and usage errors themselves and exit before we can clean up or print our line.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
import warnings

from crossearth_cli.cli import convert, models, segment, vectorize  # noqa: F401  (register)
from crossearth_cli.cli.app import app
from crossearth_cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupted,
    UserError,
    from_os_error,
    looks_out_of_memory,
)

__all__ = ["app", "main"]


class _Signals:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    The first signal stops the run: the exception unwinds through the clean-up code (temporary
    outputs aborted, threads joined). A second one during that clean-up is ignored so it cannot
    cut the clean-up short; a third quits at once (hidden temporaries of a killed run are removed
    by the next run anyway).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self.previous: dict[int, object] = {}
        self.finished: int | None = None  # the exit code, once the work and clean-up are done

    def handler(self, signum, frame) -> None:
        if self.finished is not None:  # outputs complete, temporaries gone: just end
            _end_process(self.finished)
        self.count += 1
        if self.count == 1:
            self.received = signum
            raise Interrupted(signum)
        if self.count >= 3:
            os._exit(128 + signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for sig, default in defaults.items():
            current = signal.getsignal(sig)
            if current is default:  # an ignored SIGINT (nohup, `cmd &`) stays ignored
                self.previous[sig] = current
                signal.signal(sig, self.handler)

    def restore(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous.clear()


def _end_process(code: int) -> None:
    """Exit at once with ``code``, skipping the interpreter's teardown: the run has closed
    its outputs, removed its temporaries and released its locks, and the teardown can only
    cost time (joining library thread pools) or crash (GDAL's mutexes destroyed while one of
    its threads still holds one, seen as a segfault after a SIGTERM)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _error_line(message: str) -> None:
    _stderr_line(f"crossearth: error: {message}")


def _stderr_line(line: str) -> None:
    """``line`` on stderr in one write: the ranks of a torchrun job share the stream, and a
    line written in pieces could be glued to another rank's. URLs lose their query strings
    (signatures); ``--debug``'s traceback keeps them."""
    from crossearth_cli.raster.remote import hide_queries

    line = hide_queries(line)
    sys.stderr.flush()
    data = (line + "\n").encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    try:
        os.write(sys.stderr.fileno(), data)
    except (OSError, ValueError, AttributeError):  # a captured stream without a descriptor
        print(line, file=sys.stderr, flush=True)


def _interrupted(signals: _Signals, exc: BaseException | None, debug: bool) -> int:
    if debug and exc is not None:
        traceback.print_exception(exc)
    signum = signals.received
    if signum is None and isinstance(exc, Interrupted):
        signum = exc.signum
    name = signal.Signals(signum).name if signum else "SIGINT"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and name == "SIGTERM":
        # torchrun also stops every rank when one fails: then that rank's error is the cause
        name += "; torchrun sends it to every rank when one fails too: see any error above"
    _stderr_line(f"crossearth: interrupted ({name}); temporary files removed, nothing "
                 "incomplete was left")
    return 128 + signum if signum else EXIT_INTERRUPTED


def _click_exceptions():
    """The click exception classes Typer raises (Typer ≥ 0.20 vendors its own click)."""
    import typer

    module = sys.modules[typer.BadParameter.__module__]
    return module.ClickException, getattr(module, "Abort", None) or typer.Abort


def empty_argument(args: list[str]) -> UserError | None:
    """An empty argument (``--aoi "$AOI"`` with AOI unset) is refused: as a path it would be
    the current folder (Typer reads "" as "."), so a script's typo would segment everything
    under it, or take its Shapefiles for the AOI."""
    for i, arg in enumerate(args):
        option = arg.split("=", 1)[0] if arg.startswith("--") and "=" in arg else None
        if arg == "" or (option and arg == option + "="):
            after = option or (args[i - 1] if i and args[i - 1].startswith("-") else None)
            return UserError(f'{after} is empty ("")' if after else 'an empty argument ("")',
                             hint="an unset shell variable? give a value, or leave it out")
    return None


def _run(args: list[str], debug: bool, signals: _Signals) -> int:
    click_exception, click_abort = _click_exceptions()
    try:
        empty = empty_argument(args)
        if empty is not None:
            raise empty
        rv = app(args=args, prog_name="crossearth", standalone_mode=False)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        _error_line(exc.one_line())
        return exc.exit_code
    except click_exception as exc:  # usage errors: one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":
            return exc.exit_code  # the help was printed when the error was made
        if debug:
            traceback.print_exc()
        ctx = getattr(exc, "ctx", None)
        see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error_line(_usage_message(exc) + see)
        return exc.exit_code
    except click_abort as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KeyboardInterrupt):
            return _interrupted(signals, cause, debug)
        _error_line("aborted")
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(signals, exc, debug)
    except (OSError, MemoryError, RuntimeError, ImportError) as exc:
        user = _environment_error(exc)
        if user is None:
            raise  # a bug: crash loudly, with the traceback
        if debug:
            traceback.print_exc()
        _error_line(user.one_line())
        return user.exit_code
    if signals.received is not None or rv == EXIT_INTERRUPTED:
        # Typer turns KeyboardInterrupt into ``Exit(130)`` before we can see it
        return _interrupted(signals, None, debug)
    return rv if isinstance(rv, int) else 0


def _usage_message(exc) -> str:
    """click's message, except that an unknown option suggests only options close to it
    (click offered ``--aoi, --cog`` for ``--foo``)."""
    name, possible = getattr(exc, "option_name", None), getattr(exc, "possibilities", None)
    if type(exc).__name__ != "NoSuchOption" or not name:
        return " ".join(exc.format_message().split())
    import difflib

    close = difflib.get_close_matches(name, sorted(possible or ()), n=2, cutoff=0.75)
    return f"No such option: {name}" + (f" (did you mean {' or '.join(close)}?)"
                                       if close else "")


def _environment_error(exc: BaseException) -> UserError | None:
    """Failures of the machine rather than the code: a full disk, no permission, no memory."""
    import re

    if isinstance(exc, ImportError):
        return _library_error(exc)
    if isinstance(exc, OSError):
        return from_os_error(exc)
    if looks_out_of_memory(exc):
        m = re.search(r"allocate ([\d.]+)\s*(bytes|[KMGT]i?B)", str(exc))
        if m:
            scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
                     "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}.get(m.group(2), 1)
            size = float(m.group(1)) * scale
            amount = (f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"
                      if size >= 1e6 else f"{size / 1e3:.0f} kB")
            what = f"out of memory ({amount} asked for at once)"
        else:
            what = "out of memory"
        return UserError(what, hint="memory grows with --tile (times the scene width, up to a "
                         "stripe's), and with --batch-size: use a smaller --tile or --batch-size")
    return None


def _library_error(exc: ImportError) -> UserError | None:
    """A library that cannot be loaded: too little memory to map it (a low ``ulimit -v``), or
    a broken install. Either way, not a bug of ours to show as a traceback (one of our own
    modules failing to import is: None)."""
    if (exc.name or "").split(".")[0] == "crossearth_cli":
        return None
    import re

    words = " ".join(str(exc).split())
    shared = re.search(r"[\w.+-]+\.so[\d.]*", words)  # torch._C says which .so failed
    what = exc.name or "a library"
    if what.split(".")[-1].startswith("_") and shared:
        what = shared.group(0)
    if "map segment" in words or "allocate memory" in words:
        hint = ("too little memory to load it: raise the memory limit (ulimit -v, the "
                "scheduler's request) or free some")
    else:
        hint = "the install is incomplete: reinstall it (pip install -e . in the project)"
    return UserError(f"cannot load {what} ({words})", hint=hint)


def _retry_notes():
    """GDAL's retries of a busy server's answers, shown as notes while the run waits (also
    while a file is being opened, when fd 2 is hidden from libtiff's own writes)."""
    from crossearth_cli.cli.console import note
    from crossearth_cli.raster.remote import RetryNotes

    def show(text: str) -> None:
        from crossearth_cli.raster.reader import write_past_quiet_stderr

        if not write_past_quiet_stderr(f"note: {text}"):
            note(text)

    return RetryNotes(show)


def _last_clean_up() -> None:
    """Whatever an interrupted clean-up could not reach: our temporaries and output locks."""
    writer = sys.modules.get("crossearth_cli.raster.writer")
    if writer is not None:
        writer.remove_own_temporaries()
        writer.release_output_locks()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit: 0 done, 1 some files of a batch failed, 2 usage or input error,
    130 Ctrl-C, 143 SIGTERM."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in args:  # anywhere: "please report it with --debug" gets it added last
        args = ["--debug", *(a for a in args if a != "--debug")]
    debug = "--debug" in args or os.environ.get("CROSSEARTH_DEBUG") == "1"
    if not debug:
        # GDAL prints warnings about odd files ("Warning 1: TIFFReadDirectory...") straight to
        # stderr; our one line says what matters. Must be set before GDAL's first message.
        os.environ.setdefault("CPL_LOG", os.devnull)
    signals = _Signals()
    signals.install()
    code = EXIT_USAGE
    try:
        with warnings.catch_warnings(), _retry_notes():
            if not debug:  # library warnings are for developers; users get notes and errors
                warnings.simplefilter("ignore")
            try:
                code = _run(args, debug, signals)
            except KeyboardInterrupt as exc:  # a signal during the error handling itself
                code = _interrupted(signals, exc, debug)
            finally:
                try:
                    _last_clean_up()
                except KeyboardInterrupt as exc:  # a signal landing in it (torchrun stopping
                    _last_clean_up()  # this rank as another fails): a second one is ignored
                    code = _interrupted(signals, exc, debug)
        signals.finished = code  # a signal from here on ends the process with this code
    finally:
        if argv is not None:  # called as a library (tests): give the handlers back
            signals.restore()
    if argv is None:  # the command itself: nothing left to do but exit
        _end_process(code)
    sys.exit(code)
