"""Runs that are stopped or run short of memory lose nothing and leave nothing broken; errors
read as one line (docs/reliability.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from helpers import PerPixelModel, per_pixel_spec, random_scene, run_cli, write_tif
from reliability_helpers import (
    assert_nothing_written,
    assert_user_error,
    cli,
    error_lines,
    hidden_leftovers,
    real_env,
    sigterm_when,
    snapshot,
)

from crossearth_cli.engine import SegmentSettings, segment
from crossearth_cli.errors import UserError


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return write_tif(tmp_path_factory.mktemp("big") / "big.tif", random_scene(1600, 1600))


def _interactive_signals() -> None:
    """In the child: SIGINT as a terminal gives it. Run from a background job (`cmd &` without
    job control, nohup) the suite inherits an ignored SIGINT, which `crossearth` deliberately
    keeps ignored (`test_signal_handler_semantics`); the Ctrl-C tests would see a normal exit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list, folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crossearth_cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=real_env(), preexec_fn=_interactive_signals)


def _wait_for_temporaries(proc: subprocess.Popen, folder: Path, pattern: str) -> None:
    deadline = time.time() + 180
    while not list(folder.glob(pattern)):
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be stopped: {proc.communicate()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("never saw the output being written")
        time.sleep(0.02)


# -- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"),
                                           (signal.SIGTERM, 143, "SIGTERM")],
                         ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_mid_write(tmp_path, ckpt, big, sig, code, name):
    out = tmp_path / "out.tif"
    proc = _start(["segment", big, "-c", ckpt, "-o", out, "--tile", "128",
                   "--confidence", "auto", "--probabilities", "auto"], tmp_path)
    try:
        _wait_for_temporaries(proc, tmp_path, ".out*.crossearth-tmp")
        time.sleep(0.2)  # some rows written
        t0 = time.perf_counter()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert time.perf_counter() - t0 < 30
    assert "Traceback" not in err
    assert error_lines(err) == [
        f"crossearth: interrupted ({name}); temporary files removed, nothing incomplete was "
        "left"], err
    assert list(tmp_path.iterdir()) == [], "no output, no temporary, no lock file"


def test_cancelling_a_feed_waits_for_its_running_reads():
    """A stopped run closes its readers right after cancelling their feeds; a read still
    running then would use a closed GDAL dataset (a segfault, seen once when a folder run got
    SIGTERM). So cancel() returns only when no read is running."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from crossearth_cli.raster.reader import StripFeed
    from crossearth_cli.raster.windows import tile_grid

    started, log = threading.Event(), []

    class SlowReader:  # wide enough to be read in two pieces
        width, block_width, bands, dtype = 2048, 256, [1], np.dtype(np.uint8)
        aoi = None

        def rows_empty(self, y, h):
            return False

        def read_raw(self, y, x, h, w):
            started.set()
            time.sleep(0.3)
            log.append("read done")
            return np.zeros((1, h, w), np.uint8), np.ones((h, w), bool)

    with ThreadPoolExecutor(2) as pool:
        feed = StripFeed(SlowReader(), tile_grid(64, 2048, 32, 32), pool, chunks=2).prime()
        assert started.wait(5)
        feed.cancel()
        log.append("cancel returned")
    assert log == ["read done", "read done", "cancel returned"]


def test_sigterm_in_a_batch_keeps_what_is_done_and_a_rerun_finishes(tmp_path, capfd, ckpt):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        write_tif(tiles / f"s{i}.tif", random_scene(900, 900, seed=i))
    out = tmp_path / "out"
    summary = tmp_path / "s.json"
    args = ["segment", tiles, "-o", out, "-c", ckpt, "--tile", "128", "--summary", summary]
    proc = _start(args, tmp_path)
    err = sigterm_when(proc, lambda: any(out.glob(".s1_classes.tif.*.crossearth-tmp")))
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["crossearth-manifest.jsonl",
                                                     "s0_classes.tif"]
    with rasterio.open(out / "s0_classes.tif") as ds:
        ds.read()
    # how far it got, in the log and in --summary (for the scheduler that sent the signal)
    assert "stopped (SIGTERM) after 1 of 3 file(s): their outputs are kept; the same command " \
           "again does the rest" in " ".join(err.split()), err
    data = json.loads(summary.read_text())
    assert data["interrupted"] == "SIGTERM" and data["files_done"] == 1, data
    assert data["done"] == ["s0.tif"] and data["not_run"] == ["s1.tif", "s2.tif"], data
    assert data["skipped"] == [] and data["failed"] == [], data
    code, _, err = cli(capfd, *args)  # the interrupted run's summary is ours: replaced
    assert code == 0, err
    data = json.loads(summary.read_text())
    assert data["done"] == ["s1.tif", "s2.tif"] and data["skipped"] == ["s0.tif"]
    assert "interrupted" not in data and "not_run" not in data
    assert not hidden_leftovers(tmp_path)


def test_sigkill_mid_write_then_a_rerun_finishes(tmp_path, capfd, ckpt, big):
    """(Batch runs: test_batch.py::test_sigkill_mid_file_...) A single scene killed with
    SIGKILL: nothing under the final name; its hidden temporary and lock file do not stop the
    next run, which removes them."""
    out = tmp_path / "out.tif"
    proc = _start(["segment", big, "-c", ckpt, "-o", out, "--tile", "128"], tmp_path)
    try:
        _wait_for_temporaries(proc, tmp_path, ".out.tif.*.crossearth-tmp")
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert hidden_leftovers(tmp_path), "a killed run cannot clean up: hidden files remain"
    code, _, err = cli(capfd, "segment", big, "-c", ckpt, "-o", out, "--tile", "128")
    assert code == 0, err
    with rasterio.open(out) as ds:
        assert ds.read(1).shape == (1600, 1600)
    assert not hidden_leftovers(tmp_path)


@pytest.mark.parametrize("where", ["while-a-sink-opens", "right-after-a-sink-opened"])
def test_interrupt_at_the_worst_moment_leaves_nothing(tmp_path, capfd, ckpt, monkeypatch,
                                                      where):
    """A signal can land between any two bytecodes: inside a sink's set-up (its file exists,
    the sink does not yet), or after the sink exists but before the engine recorded it. The
    run still exits 130 with nothing left (the CLI removes the process's own temporaries)."""
    from crossearth_cli import engine
    from crossearth_cli.raster import writer

    if where == "while-a-sink-opens":
        def interrupted(self, *args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(rasterio.io.DatasetWriter, "update_tags", interrupted)
    else:
        class Sink(writer.GeoTiffSink):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                raise KeyboardInterrupt  # as if SIGINT arrived on the way out

        monkeypatch.setattr(engine, "GeoTiffSink", Sink)
    src = write_tif(tmp_path / "s.tif", random_scene(64, 64))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif",
                       "--confidence", "auto")
    assert code == 130 and "Traceback" not in err, err
    assert error_lines(err)[-1].startswith("crossearth: interrupted (SIGINT)")
    assert_nothing_written(tmp_path, before)


def test_signal_handler_semantics(monkeypatch):
    """First signal: Interrupted (a KeyboardInterrupt) carrying the signal; second, during the
    clean-up: ignored; third: immediate exit. An ignored SIGINT stays ignored."""
    import crossearth_cli.cli as cli_mod
    from crossearth_cli.errors import Interrupted

    signals = cli_mod._Signals()
    with pytest.raises(Interrupted) as exc:
        signals.handler(signal.SIGTERM, None)
    assert isinstance(exc.value, KeyboardInterrupt) and exc.value.exit_code == 143
    assert signals.handler(signal.SIGTERM, None) is None  # ignored: clean-up goes on
    exits = []
    monkeypatch.setattr(cli_mod.os, "_exit", exits.append)
    signals.handler(signal.SIGINT, None)
    assert exits == [130]

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        s = cli_mod._Signals()
        s.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == s.handler
        s.restore()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


# -- out of memory ----------------------------------------------------------------------------


OUT_OF_MEMORY = {  # what each device's allocator raises
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: "
                                "can't allocate memory: you tried to allocate 113246208 bytes. "
                                "Error code 12 (Cannot allocate memory)"),
    "numpy": lambda: MemoryError("Unable to allocate 108. MiB for an array"),
    # oneDNN's convolution under a memory limit (prlimit --as=4200M, batch 36 of 512² tiles)
    "onednn": lambda: RuntimeError("could not create a primitive"),
}


def test_an_unsupported_onednn_shape_is_not_taken_for_out_of_memory():
    from crossearth_cli.errors import looks_out_of_memory

    assert not looks_out_of_memory(RuntimeError("could not create a primitive descriptor for "
                                                "a convolution forward propagation primitive"))


class OomAboveBatch(PerPixelModel):
    """Raises an out-of-memory error (CUDA's by default) for batches above ``limit`` tiles."""

    def __init__(self, limit: int, kind: str = "cuda", **kw):
        super().__init__(**kw)
        self.limit, self.kind = limit, kind
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise OUT_OF_MEMORY[self.kind]()
        return super().forward(x)


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY))
def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, kind):
    from crossearth_cli.engine import Session

    src = write_tif(tmp_path / "s.tif", random_scene(300, 260))
    results = {}
    for name, limit in (("never", 10**6), ("oom", 3)):
        spec = per_pixel_spec(num_classes=5, crop=64, stride=48)
        spec.module = OomAboveBatch(limit, kind, num_classes=5)
        out = tmp_path / f"{name}.tif"
        settings = SegmentSettings(input=src, output=out, confidence=tmp_path / f"{name}_c.tif",
                                   probabilities=tmp_path / f"{name}_p.tif", batch_size=16)
        with Session(spec, batch_size=16) as session:
            res = session.run(session.prepare(settings))
            halvings = session.predictor.halvings
        with rasterio.open(out) as a, rasterio.open(tmp_path / f"{name}_p.tif") as p:
            results[name] = (a.read(), p.read(), res, spec.module.batches, halvings)
    never, oom = results["never"], results["oom"]
    np.testing.assert_array_equal(never[0], oom[0])  # classes: identical
    np.testing.assert_array_equal(never[1], oom[1])  # probabilities: identical
    assert never[2].tiles == oom[2].tiles and never[2].class_pixels.sum() == 300 * 260
    assert never[4] == 0
    # the run that hit out-of-memory halved its batch 16 -> 8 -> 4 -> 2 and went on with it
    assert oom[4] == 3 and oom[2].batch_size == 2
    assert oom[3][:4] == [16, 8, 4, 2] and max(oom[3][4:]) == 2
    assert not hidden_leftovers(tmp_path)


def test_out_of_memory_with_one_tile_is_a_clear_error(tmp_path):
    src = write_tif(tmp_path / "s.tif", random_scene(100, 100))
    spec = per_pixel_spec(crop=64, stride=48)
    spec.module = OomAboveBatch(0)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="out of memory even with batch size 1"):
        segment(SegmentSettings(input=src, output=tmp_path / "o.tif", batch_size=4), spec)
    assert_nothing_written(tmp_path, before)
    spec.module = OomAboveBatch(0, kind="onednn")  # it says no more, and not only for memory
    with pytest.raises(UserError) as err:
        segment(SegmentSettings(input=src, output=tmp_path / "o.tif", batch_size=4), spec)
    assert "(oneDNN: could not create a primitive)" in err.value.one_line()
    assert "if memory is not short, run with --debug and report it" in err.value.one_line()


def test_out_of_memory_elsewhere_is_one_line(tmp_path, capfd, ckpt, monkeypatch):
    """Host memory running out (torch's allocator, numpy's MemoryError) outside the batch
    loop: one line with a hint, exit 2."""
    from crossearth_cli import engine

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(engine, "RowBandAccumulator", no_memory)
    src = write_tif(tmp_path / "s.tif", random_scene(64, 64))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif")
    assert_user_error(code, err, "out of memory (68.7 GB asked for at once)", "--tile")
    assert_nothing_written(tmp_path, before)
    monkeypatch.setattr(engine, "RowBandAccumulator", lambda *a, **k: (_ for _ in ()).throw(
        OUT_OF_MEMORY["cpu"]()))
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif")
    assert_user_error(code, err, "out of memory (113 MB asked for at once)")  # not "0.1 GB"
    monkeypatch.setattr(engine, "RowBandAccumulator", lambda *a, **k: (_ for _ in ()).throw(
        MemoryError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                    "262144 bytes")))
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif")
    assert_user_error(code, err, "out of memory (262 kB asked for at once)")  # not "0 MB"


# -- how errors read ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, named", [
    (["segment", ""], 'an empty argument ("")'),
    (["segment", "scene.tif", "--aoi", ""], '--aoi is empty ("")'),
    (["segment", "scene.tif", "--aoi="], '--aoi is empty ("")'),
    (["segment", "scene.tif", "-o", ""], '-o is empty ("")'),
    (["vectorize", "scene.tif", "--confidence", "", "-o", "v.gpkg"],
     '--confidence is empty ("")'),
])
def test_an_empty_argument_is_refused_not_taken_for_the_current_folder(
        tmp_path, capfd, ckpt, monkeypatch, args, named):
    """``--aoi "$AOI"`` with AOI unset: Typer reads "" as ".", the current folder, whose
    rasters would all be segmented (or whose Shapefiles taken for the AOI)."""
    write_tif(tmp_path / "scene.tif", random_scene(64, 64))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, *args, "-c", ckpt) if args[0] == "segment" else cli(capfd, *args)
    assert_user_error(code, err, named, "an unset shell variable?")
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("typed, said", [
    ("--confidance", "No such option: --confidance (did you mean --confidence?)"),
    ("--tiles", "No such option: --tiles (did you mean --tile?)"),
    ("--foo", "No such option: --foo (see 'crossearth segment --help')"),  # was: --aoi, --cog
])
def test_an_unknown_option_suggests_only_close_ones(tmp_path, capfd, typed, said):
    code, _, err = cli(capfd, "segment", tmp_path / "a.tif", typed, "1")
    assert_user_error(code, err, said)


def test_debug_shows_the_traceback(tmp_path, capfd, ckpt):
    args = ("segment", tmp_path / "missing.tif", "-c", ckpt)
    code, _, err = cli(capfd, *args)
    assert_user_error(code, err, "missing.tif", "no such file")
    for debug in (("--debug", *args), (*args, "--debug")):  # before the command, or anywhere
        code, _, err = cli(capfd, *debug)
        assert code == 2
        assert "Traceback (most recent call last)" in err and "InputError" in err
        assert error_lines(err)[-1].startswith("crossearth: error: ")
    proc = run_cli(*args, env=real_env(CROSSEARTH_DEBUG="1"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["segment", "--no-such-option", "x.tif"], "no such option"),
    (["segment", "x.tif", "--tile", "abc"], "--tile"),
    (["segment"], "missing argument"),
    (["no-such-command"], "no such command"),
    (["vectorize", "c.tif"], "missing option"),
], ids=["unknown-option", "bad-number", "missing-argument", "unknown-command", "missing-option"])
def test_usage_errors_are_one_line(capfd, args, needle):
    code, _, err = cli(capfd, *args)
    line = assert_user_error(code, err, needle)
    assert "--help" in line


def test_no_arguments_prints_the_help(capfd):
    code, out, err = cli(capfd)
    assert code == 2 and "Usage" in out + err and "Traceback" not in out + err


def test_a_bug_still_crashes_loudly(tmp_path, capfd, ckpt, monkeypatch):
    """Only user and environment errors are turned into one line: a bug keeps its traceback
    (so it gets reported), it is not dressed up as the user's fault."""
    from crossearth_cli import engine

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine, "tile_grid", bug)
    src = write_tif(tmp_path / "s.tif", random_scene(64, 64))
    with pytest.raises(ZeroDivisionError):
        cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif")
    assert not hidden_leftovers(tmp_path)


def test_an_error_line_is_written_in_one_piece(capfd, monkeypatch):
    """Every rank of a torchrun job prints its error on the shared stderr; written in two
    pieces (text, then newline), two ranks' lines came out glued together."""
    import os

    from crossearth_cli import cli

    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    cli._error_line("/data/a.tif: no such file (check the path)")
    assert writes == [b"crossearth: error: /data/a.tif: no such file (check the path)\n"]
    assert capfd.readouterr().err.endswith("no such file (check the path)\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_the_work_is_done_ends_with_the_runs_own_code(sig):
    """Once the outputs are complete and the temporaries gone, a signal ends the process at
    once with the run's exit code. Before, the default handlers were back by then: a late
    Ctrl-C killed the process (exit -2, no line) while the interpreter tore down."""
    code = (
        "import os, signal, time\n"
        "from crossearth_cli.cli import _Signals\n"
        "s = _Signals(); s.install(); s.finished = 0\n"
        "print('done', flush=True)\n"
        f"os.kill(os.getpid(), {int(sig)}); time.sleep(30); print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc


def test_a_library_that_cannot_be_loaded_is_one_line(tmp_path, capfd, ckpt, monkeypatch):
    """A low memory limit can stop torch's libraries from loading (`ulimit -v`): one line
    saying so, not a traceback. An import error of our own code stays a crash (a bug)."""
    from crossearth_cli import engine

    src = write_tif(tmp_path / "s.tif", random_scene(64, 64))

    def no_room(*args, **kwargs):
        raise ImportError("libtorch_cpu.so: failed to map segment from shared object",
                          name="torch")

    monkeypatch.setattr(engine, "RowBandAccumulator", no_room)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif")
    assert_user_error(code, err, "cannot load torch (libtorch_cpu.so: failed to map segment",
                      "raise the memory limit")

    def ours(*args, **kwargs):
        raise ImportError("cannot import name 'x'", name="crossearth_cli.raster.writer")

    monkeypatch.setattr(engine, "RowBandAccumulator", ours)
    with pytest.raises(ImportError):
        cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "o.tif")


# -- a scene's outputs appear together, or not at all ------------------------------------------


def _stop_after_renaming(monkeypatch, name: str) -> None:
    """A signal landing just after ``name`` was renamed into place (while its lock goes)."""
    from crossearth_cli.raster import writer

    real = writer.release_output_lock
    fired = []

    def release(final):
        if Path(final).name == name and not fired:  # a signal comes once
            fired.append(final)
            raise KeyboardInterrupt
        return real(final)

    monkeypatch.setattr(writer, "release_output_lock", release)


def test_a_stop_just_after_the_class_raster_is_renamed_leaves_no_output(tmp_path, monkeypatch):
    """The class raster is renamed last; a signal right after its rename took back only the
    confidence raster, so the class raster stayed alone and a rerun was refused ("output
    exists"), though the run said nothing incomplete was left."""
    src = write_tif(tmp_path / "s.tif", random_scene(80, 80))
    out, conf = tmp_path / "out.tif", tmp_path / "out_confidence.tif"
    _stop_after_renaming(monkeypatch, "out.tif")
    with pytest.raises(KeyboardInterrupt):
        segment(SegmentSettings(input=src, output=out, confidence=conf), per_pixel_spec())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_a_split_scene_merge_stopped_leaves_none_of_its_outputs(tmp_path, monkeypatch):
    """torchrun's rank 0 merged and renamed each output on its own, class raster first: a
    stop or failure in between left some of them (and the rerun was refused). Now committed
    together, as one process does: none is left, and the parts stay for the caller."""
    from crossearth_cli.distributed import merge_row_parts, part_path

    finals = [tmp_path / "big.tif", tmp_path / "big_confidence.tif"]
    parts_of = {}
    for final in finals:
        parts_of[final] = [part_path(final, i, 2) for i in range(2)]
        for i, part in enumerate(parts_of[final]):
            write_tif(part, np.full((1, 40, 60), i + 1, dtype=np.uint8),
                      transform=rasterio.transform.from_origin(5e5, 58e5 - 20 * i, 0.5, 0.5))
    _stop_after_renaming(monkeypatch, "big.tif")  # the last renamed: the confidence is in place
    with pytest.raises(KeyboardInterrupt):
        merge_row_parts(parts_of)
    assert not any(f.exists() for f in finals)
    assert all(p.exists() for ps in parts_of.values() for p in ps)
    monkeypatch.undo()
    assert merge_row_parts(parts_of) == finals
    with rasterio.open(finals[0]) as ds:
        assert ds.height == 80 and (ds.read(1)[:40] == 1).all() and (ds.read(1)[40:] == 2).all()
    assert not any(p.exists() for ps in parts_of.values() for p in ps)


def test_a_rank_stopped_by_torchrun_points_to_the_error_that_stopped_it(capfd, monkeypatch):
    """torchrun sends SIGTERM to every rank when one fails: those ranks said only
    "interrupted (SIGTERM)", as if a user had stopped the job."""
    from crossearth_cli.cli import _interrupted

    class Received:
        received = signal.SIGTERM

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _interrupted(Received(), None, debug=False) == 143
    said = capfd.readouterr().err
    assert "interrupted (SIGTERM; torchrun sends it to every rank when one fails too: see any " \
           "error above)" in said, said
    monkeypatch.setenv("WORLD_SIZE", "1")
    _interrupted(Received(), None, debug=False)
    assert "interrupted (SIGTERM); temporary files removed" in capfd.readouterr().err


def test_a_signal_during_the_last_clean_up_is_one_line(capfd, monkeypatch):
    """A SIGTERM landing in the clean-up after the run (torchrun stopping a rank that had just
    reported its own error) escaped with a traceback; it is the interrupted line, exit 143,
    and the clean-up is done anyway."""
    from crossearth_cli.cli import main
    from crossearth_cli.errors import Interrupted
    from crossearth_cli.raster import writer

    calls = []

    def remove():
        calls.append(1)
        if len(calls) == 1:
            raise Interrupted(signal.SIGTERM)
        return []

    monkeypatch.setattr(writer, "remove_own_temporaries", remove)
    with pytest.raises(SystemExit) as exc:
        main(["models"])
    err = capfd.readouterr().err
    assert exc.value.code == 143 and "Traceback" not in err, err
    assert error_lines(err)[-1].startswith("crossearth: interrupted (SIGTERM"), err
    assert len(calls) == 2  # done again after the signal
