"""Shared by the reliability tests (docs/reliability.md): run the CLI, check how it answered.

``cli`` runs ``crossearth`` in this process (fast: no interpreter start); it captures file
descriptors 1 and 2, so anything GDAL writes straight to stderr counts against the one-line
rule too. The tests that need a real process (signals, locks, a full disk) use
``helpers.run_cli``.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# As the CLI does for itself: GDAL's own "Warning 1: ..." lines go to /dev/null, so that in
# this shared process they cannot leak into a captured stderr.
os.environ.setdefault("CPL_LOG", os.devnull)


def real_env(**extra: str) -> dict[str, str]:
    """The environment for a real ``crossearth`` process: as a user's, without the CPL_LOG this
    module set for the test process."""
    env = {k: v for k, v in os.environ.items() if k != "CPL_LOG"}
    env.update(extra)
    return env


def tiny_checkpoint(path: Path, num_classes: int = 4, **kw) -> Path:
    """A random-weight CrossEarth checkpoint in the released (mmengine) format."""
    from crossearth_cli.model.random_init import tiny_config, write_random_checkpoint

    return write_random_checkpoint(path, tiny_config(num_classes=num_classes), seed=0,
                                   fmt="mmengine", **kw)


def cli(capfd, *args) -> tuple[int, str, str]:
    """``crossearth ARGS`` in-process: (exit code, stdout, stderr)."""
    from crossearth_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capfd.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out.out, out.err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def assert_user_error(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    """Exit code 2, exactly one line on stderr, ``crossearth: error: ...``, no traceback."""
    assert code == exit_code, (code, err)
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("crossearth: error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def hidden_leftovers(folder: Path) -> list[str]:
    """Temporaries and lock files a run left behind (there must be none once it ended)."""
    return sorted(
        str(p.relative_to(folder)) for p in Path(folder).rglob(".*")
        if p.name.endswith((".crossearth-tmp", ".lock")) or ".crossearth-tmp." in p.name
        or "-journal" in p.name
    )


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def assert_nothing_written(folder: Path, before: set[str]) -> None:
    """No new file of any kind: no output under a final name, no temporary, no lock."""
    new = snapshot(folder) - before
    assert not new, sorted(new)


def classic_tiff(path: Path, width: int, height: int, bands: int = 3, tiled: bool = False,
                 data_offset: int = 8, data_bytes: int | None = None) -> Path:
    """A minimal uncompressed little-endian TIFF whose header claims ``width``×``height``
    while the file holds a few hundred bytes (one strip or one 256×256 tile)."""
    entries: list[tuple[int, int, int, int]] = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
        (262, 3, 1, 2 if bands == 3 else 1), (277, 3, 1, bands), (284, 3, 1, 1),
    ]
    if tiled:
        entries += [(322, 3, 1, 256), (323, 3, 1, 256), (324, 4, 1, data_offset),
                    (325, 4, 1, data_bytes or 256 * 256 * bands)]
    else:
        entries += [(273, 4, 1, data_offset), (278, 4, 1, height),
                    (279, 4, 1, data_bytes or min(width * height * bands, 2**32 - 1))]
    entries.sort()
    ifd = 8 + 256
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd) + bytes(256))
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if typ == 3:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    Path(path).write_bytes(bytes(out))
    return Path(path)


def unsort_tiff_tags(path: Path) -> None:
    """Swap the first two entries of the first IFD of a classic little-endian TIFF: GDAL still
    reads the file, and warns ("tags are not sorted in ascending order") on stderr."""
    data = bytearray(Path(path).read_bytes())
    assert data[:4] == b"II*\x00", "classic little-endian TIFF expected"
    ifd = struct.unpack_from("<I", data, 4)[0]
    a, b = ifd + 2, ifd + 14
    data[a:a + 12], data[b:b + 12] = data[b:b + 12], data[a:a + 12]
    Path(path).write_bytes(bytes(data))


# -- a separate process that runs CLI commands (fuzzing: hangs and crashes are caught) ---------


def warm_up() -> None:
    """Import what a run needs once, so the first timed case does not pay for it."""
    import rasterio  # noqa: F401
    import torch  # noqa: F401

    import crossearth_cli.cli  # noqa: F401
    import crossearth_cli.engine  # noqa: F401


def run_captured(args: list[str]) -> tuple[object, str, str]:
    """Run ``crossearth ARGS`` in this (worker) process: (exit code, stdout, stderr).

    stderr includes what C libraries write to file descriptor 2. An exception escaping
    ``main`` is returned as ``"crash: ..."`` with its traceback in stderr.
    """
    import contextlib
    import io
    import sys
    import tempfile
    import traceback

    from crossearth_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryFile() as fd_err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(fd_err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(args))
                    code: object = 0
                except SystemExit as exc:
                    code = 0 if exc.code is None else exc.code
                except BaseException as exc:  # noqa: BLE001 - reported to the test as a crash
                    code = f"crash: {type(exc).__name__}: {exc}"
                    err.write(traceback.format_exc())
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        fd_err.seek(0)
        c_level = fd_err.read().decode("utf-8", "replace")
    return code, out.getvalue(), err.getvalue() + c_level


class CliWorker:
    """One spawned process running CLI commands, each bounded in time. A case that hangs is
    killed with its process (and a fresh one started); a case that kills the process (a
    segfault) is reported as such."""

    def __init__(self) -> None:
        self.ex = None
        self._start()

    def _start(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.ex.submit(warm_up).result(timeout=120)

    def run(self, args: list[str], timeout: float) -> tuple[object, str, str]:
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        fut = self.ex.submit(run_captured, [str(a) for a in args])
        try:
            return fut.result(timeout=timeout)
        except FutureTimeout:
            self.restart()
            raise AssertionError(
                f"no answer within {timeout} s (hang): crossearth {args}") from None
        except BrokenProcessPool:
            self.restart()
            raise AssertionError(f"the process died (crash): crossearth {args}") from None

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        procs = list(getattr(self.ex, "_processes", {}).values())
        for p in procs:
            p.kill()
        self.ex.shutdown(wait=True, cancel_futures=True)


def sigterm_when(proc, ready: Callable[[], bool], timeout: float = 180) -> str:
    """Wait until ``ready()`` while ``proc`` runs, send it SIGTERM, and return its stderr;
    a process that ends first, or never gets ready, fails the test (and is killed)."""
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"finished before it could be stopped: {proc.communicate()}")
            if time.time() > deadline:
                pytest.fail("never reached the moment to stop it")
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
