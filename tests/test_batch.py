"""Folders of scenes: resume, failures, killed runs, and torchrun scale-out on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import random_scene, run_cli, write_tif
from reliability_helpers import hidden_leftovers

from crossearth_cli.batch import BatchInput, Manifest, expand_inputs, split_for_rank


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from crossearth_cli.model.random_init import tiny_config, write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    return write_random_checkpoint(path, tiny_config(num_classes=4), seed=1, fmt="mmengine")


def make_folder(root: Path, n: int = 6, size: int = 160, corrupt: int | None = 3) -> Path:
    tiles = root / "tiles"
    for i in range(n):
        sub = tiles / ("north" if i % 2 else "south")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"tile_{i}.tif"
        if i == corrupt:
            path.write_bytes(b"II*\x00" + os.urandom(300))  # a TIFF header and garbage
        else:
            write_tif(path, random_scene(size, size + 8 * i, seed=i))
    return tiles


def segment_folder(tiles: Path, out: Path, ckpt: Path, *extra: str):
    summary = out.parent / f"summary_{time.monotonic_ns()}.json"
    proc = run_cli("segment", tiles, "-o", out, "-c", ckpt, "--tile", "64", "--stride", "48",
                   "--summary", summary, *extra)
    data = json.loads(summary.read_text()) if summary.exists() else None
    return proc, data


def class_outputs(out: Path) -> dict[str, float]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns
            for p in sorted(out.rglob("*_classes.tif"))}


def test_resume_failures_and_settings_changes(tmp_path, tiny_ckpt):
    tiles = make_folder(tmp_path)
    out = tmp_path / "out"
    proc, first = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    # one corrupt file: 5 outputs, the failure recorded, exit code 1
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert first["files_done"] == 5 and first["files_failed"] == 1
    assert first["failed"][0]["input"] == "north/tile_3.tif"
    assert "tile_3.tif" in proc.stdout and "failed" in proc.stdout
    failed_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("failed:"))
    assert failed_line.count("north/tile_3.tif") == 1, failed_line  # named once, not twice
    outs = class_outputs(out)
    assert sorted(outs) == [f"{d}/tile_{i}_classes.tif" for d, i in
                            [("north", 1), ("north", 5), ("south", 0), ("south", 2),
                             ("south", 4)]]
    assert (out / "south" / "tile_0_confidence.tif").exists()
    records = [json.loads(x) for x in (out / "crossearth-manifest.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {"done", "failed"}

    # rerun: nothing is processed (only the corrupt file is retried and fails again)
    proc, again = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert again["files_done"] == 0 and again["files_skipped"] == 5
    assert again["files_failed"] == 1 and proc.returncode == 1
    assert class_outputs(out) == outs
    assert again["seconds"] < 0.1 * first["seconds"], (again["seconds"], first["seconds"])

    # fix the corrupt input: only it runs, and now everything succeeds
    (tiles / "north" / "tile_3.tif").unlink()
    write_tif(tiles / "north" / "tile_3.tif", random_scene(100, 100, seed=9))
    proc, fixed = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert proc.returncode == 0 and fixed["done"] == ["north/tile_3.tif"]
    outs = class_outputs(out)

    # an all-done rerun loads no model at all
    proc, idle = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert proc.returncode == 0 and idle["files_skipped"] == 6 and idle["files_done"] == 0

    # deleting one output redoes only that one
    (out / "south" / "tile_2_confidence.tif").unlink()
    proc, redo = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert proc.returncode == 0 and redo["done"] == ["south/tile_2.tif"]
    after = class_outputs(out)
    assert [k for k in after if after[k] != outs[k]] == ["south/tile_2_classes.tif"]

    # touching an input (new mtime) redoes it
    os.utime(tiles / "south" / "tile_4.tif", ns=(time.time_ns(), time.time_ns()))
    proc, touched = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert touched["done"] == ["south/tile_4.tif"]

    # an output replaced by one of the same size (another run writing into the sub-folder,
    # an edit in place) is not the one recorded: redone
    replaced = out / "north" / "tile_1_classes.tif"
    data = bytearray(replaced.read_bytes())
    data[-1] ^= 1
    replaced.write_bytes(bytes(data))
    proc, redone = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert redone["done"] == ["north/tile_1.tif"], redone

    # records of earlier versions hold outputs' sizes alone: still skipped by them
    manifest = out / "crossearth-manifest.jsonl"
    records = [json.loads(x) for x in manifest.read_text().splitlines()]
    for r in records:
        for made in (r.get("outputs") or {}).values():
            made.pop("mtime_ns")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc, old = segment_folder(tiles, out, tiny_ckpt, "--confidence", "auto")
    assert old["files_done"] == 0 and old["files_skipped"] == 6, old

    # changing --tile redoes all of them
    proc = run_cli("segment", tiles, "-o", out, "-c", tiny_ckpt, "--tile", "96", "--stride",
                   "48", "--confidence", "auto", "--summary", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["files_done"] == 6


def test_globs_several_arguments_and_vrt(tmp_path, tiny_ckpt):
    tiles = make_folder(tmp_path, n=4, corrupt=None)
    out = tmp_path / "o"
    proc = run_cli("segment", str(tiles / "**" / "tile_[01].tif"), str(tiles / "south"),
                   "-o", out, "-c", tiny_ckpt, "--tile", "64", "--stride", "48",
                   "--vrt", tmp_path / "mosaic.vrt")
    assert proc.returncode == 0, proc.stderr
    assert sorted(class_outputs(out)) == [
        "north/tile_1_classes.tif", "south/tile_0_classes.tif", "tile_2_classes.tif"
    ]
    with rasterio.open(tmp_path / "mosaic.vrt") as ds:
        assert ds.count == 1 and ds.nodata == 255 and ds.colormap(1)
        assert ds.read(1).shape == ds.shape


def test_bad_batch_options_are_usage_errors(tmp_path, tiny_ckpt):
    tiles = make_folder(tmp_path, n=2, corrupt=None)
    proc = run_cli("segment", tiles, "-o", tmp_path / "o", "-c", tiny_ckpt, "--confidence",
                   "x.tif")
    assert proc.returncode == 2 and "auto" in proc.stderr and "Traceback" not in proc.stderr


def test_symlink_loops_and_outputs_inside_the_input_folder(tmp_path, tiny_ckpt):
    tiles = make_folder(tmp_path, n=2, corrupt=None)
    (tiles / "south" / "loop").symlink_to(tiles, target_is_directory=True)
    items = expand_inputs([str(tiles)], exclude=tiles / "out")
    assert [i.rel.as_posix() for i in items] == ["north/tile_1.tif", "south/tile_0.tif"]
    proc = run_cli("segment", tiles, "-o", tiles / "out", "-c", tiny_ckpt, "--tile", "64")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("segment", tiles, "-o", tiles / "out", "-c", tiny_ckpt, "--tile", "64")
    assert proc.returncode == 0 and "tile_0_classes_classes" not in proc.stdout
    assert not list((tiles / "out").rglob("*_classes_classes.tif"))


def test_split_for_rank_is_a_deterministic_partition(tmp_path):
    items = [BatchInput(tmp_path / f"{i}.tif", Path(f"{i}.tif")) for i in range(11)]
    for i, it in enumerate(items):
        it.path.write_bytes(b"x" * (100 * (i % 4 + 1)))
    parts = [split_for_rank(items, r, 3) for r in range(3)]
    flat = [it.rel for p in parts for it in p]
    assert sorted(flat) == sorted(it.rel for it in items) and len(flat) == len(set(flat))
    assert parts == [split_for_rank(items, r, 3) for r in range(3)]


def _valid_or_absent(path: Path) -> None:
    with rasterio.open(path) as ds:
        ds.read()  # a truncated file fails here


def test_sigkill_mid_file_leaves_no_broken_output_and_a_rerun_finishes(tmp_path, tiny_ckpt):
    tiles = tmp_path / "big"
    tiles.mkdir()
    for i in range(3):
        write_tif(tiles / f"scene_{i}.tif", random_scene(700, 700, seed=i))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "crossearth_cli", "segment", str(tiles), "-o", str(out), "-c",
           str(tiny_ckpt), "--tile", "128", "--stride", "64", "--confidence", "auto"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        # wait until the second scene is being written (its hidden temp file exists)
        while time.time() < deadline:
            if list(out.glob(".scene_1_classes.tif.*")):
                break
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("never saw the second scene being written")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finals = sorted(out.glob("*.tif"))
    assert all(p.name.startswith("scene_0") for p in finals), finals
    for p in finals:
        _valid_or_absent(p)
    assert list(out.glob(".scene_1_*")), "the killed file's temporaries are hidden names"
    rerun = run_cli(*cmd[3:])
    assert rerun.returncode == 0, rerun.stderr
    finals = sorted(p.name for p in out.glob("*.tif"))
    assert finals == sorted(f"scene_{i}_{k}.tif" for i in range(3)
                            for k in ("classes", "confidence"))
    for p in out.glob("*.tif"):
        _valid_or_absent(p)
    assert not list(out.glob(".*crossearth-tmp")), "stale temporaries of dead runs are removed"


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "crossearth_cli", *map(str, args)]
    # torchrun's agent leaves a torchelastic_* folder in the temporary folder of every run
    with tempfile.TemporaryDirectory(prefix="crossearth-torchrun-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _alone_and_torchrun(inp, one, two, ckpt, *opts, one_only=(), two_only=()):
    """``segment`` of ``inp`` in one process into ``one``, then on two ranks into ``two``
    (both must succeed); the torchrun run's process."""
    proc = run_cli("segment", inp, "-o", one, "-c", ckpt, *opts, *one_only)
    assert proc.returncode == 0, proc.stderr
    proc = _torchrun("segment", inp, "-o", two, "-c", ckpt, *opts, *two_only)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_ckpt):
    tiles = make_folder(tmp_path, n=5, corrupt=None)
    one, two = tmp_path / "one", tmp_path / "two"
    _alone_and_torchrun(tiles, one, two, tiny_ckpt, "--tile", "64",
                        two_only=("--summary", tmp_path / "two.json"))
    summary = json.loads((tmp_path / "two.json").read_text())
    assert summary["ranks"] == 2 and summary["files_done"] == 5
    assert sorted(class_outputs(one)) == sorted(class_outputs(two))
    for rel in class_outputs(one):
        with rasterio.open(one / rel) as a, rasterio.open(two / rel) as b:
            np.testing.assert_array_equal(a.read(), b.read())
    # no file processed twice: each input has exactly one record across the rank manifests
    inputs = []
    manifests = sorted(two.glob("crossearth-manifest*.jsonl"))
    assert len(manifests) == 2
    for m in manifests:
        inputs += [json.loads(x)["input"] for x in m.read_text().splitlines()]
    assert sorted(inputs) == sorted(set(inputs)) and len(inputs) == 5
    assert Manifest(two).records.keys() == set(inputs)


def test_torchrun_splits_one_scene_into_row_bands(tmp_path, tiny_ckpt):
    img = random_scene(300, 190, seed=4)
    img[:, :150] = 0  # rank 0's band is all nodata: its counts alone are not the scene's
    src = write_tif(tmp_path / "scene.tif", img, nodata=0)
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    proc = _alone_and_torchrun(src, one, two, tiny_ckpt, "--tile", "64", "--stride", "40",
                               "--confidence", "auto",
                               one_only=("--summary", tmp_path / "one.json"),
                               two_only=("--summary", tmp_path / "two.json"))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["output"] == str(two) and b["ranks"] == 2
    for key in ("width", "height", "pixels", "nodata_pixels", "class_shares"):
        assert a[key] == b[key], key
    assert "over 2 ranks" in proc.stdout and "nodata 50.0%" in proc.stdout
    with rasterio.open(one) as a, rasterio.open(two) as b:
        assert (a.transform, a.crs, a.shape) == (b.transform, b.crs, b.shape)
        np.testing.assert_array_equal(a.read(), b.read())
        assert b.colormap(1) == a.colormap(1) and b.tags()["classes"] == a.tags()["classes"]
    with rasterio.open(tmp_path / "one_confidence.tif") as a, \
            rasterio.open(tmp_path / "two_confidence.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert sorted(p.name for p in tmp_path.glob("*.tif")) == sorted(
        ["scene.tif", "one.tif", "two.tif", "one_confidence.tif", "two_confidence.tif"])
    assert not list(tmp_path.glob(".*part*"))


def test_many_outputs_share_the_writer_threads(tmp_path, monkeypatch):
    """A folder run writes thousands of small files: their writes run on one shared pool of
    threads, not a thread started (and joined) per file; a sink that fails leaves the pool
    working for the next."""
    import threading

    from rasterio.transform import Affine

    from crossearth_cli.raster import writer

    starts = []
    start = threading.Thread.start

    def counting(self):
        if self.name.startswith("crossearth-write"):
            starts.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    rows = np.random.default_rng(0).integers(0, 4, (300, 200), dtype=np.uint8)
    transform = Affine(0.5, 0, 500000, 0, -0.5, 5800000)
    files = 24
    for i in range(files):
        spec = writer.RasterSpec(path=tmp_path / f"f{i}.tif", count=1, dtype="uint8", nodata=255)
        sink = writer.GeoTiffSink(spec, *rows.shape, "EPSG:32631", transform)
        sink.write_rows(0, rows[:256])
        if i == 3:  # killed half-way: its temporary goes, the pool stays
            sink.abort()
            assert not sink.tmp.exists()
            continue
        sink.write_rows(256, rows[256:])
        sink.commit()
    assert len(starts) <= writer._write_pool()._max_workers < files
    for i in (0, files - 1):
        with rasterio.open(tmp_path / f"f{i}.tif") as ds:
            assert np.array_equal(ds.read(1), rows)
    monkeypatch.undo()
    # a forked child (the vector workers fork) has none of the pool's threads: it must start
    # its own rather than queue writes on threads that do not exist there and hang
    pid = os.fork()
    if pid == 0:
        try:
            spec = writer.RasterSpec(path=tmp_path / "child.tif", count=1, dtype="uint8",
                                     nodata=255)
            sink = writer.GeoTiffSink(spec, *rows.shape, "EPSG:32631", transform)
            sink.write_rows(0, rows)
            sink.commit()
        finally:
            os._exit(0)
    deadline = time.time() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a forked child's write hung")
        time.sleep(0.05)
    with rasterio.open(tmp_path / "child.tif") as ds:
        assert np.array_equal(ds.read(1), rows)


def test_stale_temporaries_are_found_from_one_listing_of_the_folder(tmp_path, monkeypatch):
    """Each output's leftover temporaries (a killed run's) are removed when it is written
    again, without listing its folder once per file (that grew with the folder: 19 ms a file
    at 30,000 entries). Temporaries of a live process stay."""
    from crossearth_cli.raster import writer

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()

    def temp(name, pid):
        p = tmp_path / f".{name}.{pid}.0123abcd.crossearth-tmp"
        p.write_bytes(b"partial")
        return p

    a_dead, a_dotted = temp("a.tif", dead.pid), temp("a.b.tif", dead.pid)
    b_live, c_dead = temp("b.tif", live), temp("c.tif", dead.pid)
    c_overviews = c_dead.with_name(c_dead.name + ".ovr.tmp")  # the COG driver's, left by a kill
    c_overviews.write_bytes(b"partial")
    for i in range(50):
        (tmp_path / f"tile_{i}_classes.tif").touch()
    listings = []
    listdir = os.listdir
    monkeypatch.setattr(writer.os, "listdir", lambda p: listings.append(p) or listdir(p))
    assert writer.remove_stale_temps(tmp_path / "a.tif") == [a_dead]
    assert writer.remove_stale_temps(tmp_path / "a.b.tif") == [a_dotted]
    assert writer.remove_stale_temps(tmp_path / "b.tif") == []
    assert writer.remove_stale_temps(tmp_path / "c.tif") == [c_dead, c_overviews]
    for i in range(50):
        assert writer.remove_stale_temps(tmp_path / f"tile_{i}_classes.tif") == []
    assert len(listings) == 1
    assert b_live.exists() and not (a_dead.exists() or a_dotted.exists() or c_dead.exists()
                                    or c_overviews.exists())
    # a GeoPackage's temporary and SQLite's journal beside it
    d_dead = tmp_path / f".d.gpkg.{dead.pid}.0123abcd.crossearth-tmp.gpkg"
    d_journal = d_dead.with_name(d_dead.name + "-journal")
    for p in (d_dead, d_journal):
        p.write_bytes(b"partial")
    writer._temp_index.clear()  # listed again, as by the next process
    assert writer.remove_stale_temps(tmp_path / "d.gpkg") == [d_dead, d_journal]
    # a long name's temporaries are named from a cut, hashed name (within 255 bytes)
    long_final = tmp_path / ("a" * 225 + ".gpkg")
    mine = writer.temp_path_for(long_final)
    assert len(mine.name) < 200
    long_dead = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{dead.pid}.") + ".gpkg")
    long_dead.write_bytes(b"partial")
    writer._temp_index.clear()
    assert writer.remove_stale_temps(long_final) == [long_dead]



def test_a_killed_runs_geopackage_temporary_is_removed_by_the_next_run(tmp_path, tiny_ckpt):
    """The GeoPackage's temporary is named with its writer's pid, as the rasters' are: one
    a killed run left (with its journal) goes when the file is written again."""
    from crossearth_cli.vector.writer import GpkgWriter

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "t0.tif", random_scene(48, 48))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    left = [out / f".t0.gpkg.{dead.pid}.0123abcd.crossearth-tmp.gpkg{side}"
            for side in ("", "-journal")]
    for p in left:
        p.write_bytes(b"partial")
    writing = GpkgWriter(tmp_path / "x.gpkg", None)  # how a live writer names its temporary
    assert writing.tmp.name.startswith(f".x.gpkg.{os.getpid()}.")
    writing.abort()
    proc = run_cli("segment", tiles, "-o", out, "-c", tiny_ckpt, "--vector", "auto")
    assert proc.returncode == 0, proc.stderr
    assert (out / "t0.gpkg").exists() and not any(p.exists() for p in left)
    assert hidden_leftovers(out) == []


def test_a_folder_says_once_that_its_outputs_have_no_crs(tmp_path, tiny_ckpt):
    """Notes about the outputs (and a guess of the bands) reach a folder run too, once, with
    a count of the others; the other per-file set-up notes stay quiet."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):  # bands not marked red, green, blue: the model's bands are guessed
        write_tif(tiles / f"t{i}.tif", random_scene(48, 48, seed=i), crs=None,
                  photometric="MINISBLACK")
    proc = run_cli("segment", tiles, "-o", tmp_path / "o", "-c", tiny_ckpt, "--tile", "64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("has no CRS") == 2, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "likewise for 2 more file(s) (t1.tif, t2.tif; --summary FILE lists every" in said, \
        said
    # guessed bands decide every result: told once too (their colours are not marked)
    assert said.count("bands 1,2,3 are assumed to be red, green, blue") == 2, proc.stderr
    assert "t0.tif: bands 1,2,3 are assumed" in said, proc.stderr
    assert "scaled to 0-255" not in said  # per-file set-up notes stay quiet


def test_torchrun_split_scene_with_fewer_tile_rows_than_ranks(tmp_path, tiny_ckpt):
    """A scene of one tile row split over two ranks: one rank has no rows and writes no part
    (it tried to create a W×0 raster and the run failed); the result equals one process."""
    src = write_tif(tmp_path / "scene.tif", random_scene(50, 150, seed=6))
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    _alone_and_torchrun(src, one, two, tiny_ckpt, "--tile", "64",
                        two_only=("--summary", tmp_path / "two.json"))
    with rasterio.open(one) as a, rasterio.open(two) as b:
        assert (a.transform, a.crs, a.shape) == (b.transform, b.crs, b.shape)
        np.testing.assert_array_equal(a.read(), b.read())
    summary = json.loads((tmp_path / "two.json").read_text())
    assert summary["ranks"] == 2 and summary["height"] == 50
    assert not list(tmp_path.glob(".*part*"))


def test_torchrun_split_scene_refuses_a_bad_vector_output_before_any_work(tmp_path, tiny_ckpt):
    """One scene split across ranks checks --vector up front, as a single process does: an
    existing GeoPackage (no --overwrite) or a non-.gpkg name ends the run before any rank
    segments, with exit code 2 and nothing written."""
    src = write_tif(tmp_path / "scene.tif", random_scene(200, 190, seed=5))
    existing = tmp_path / "roads.gpkg"
    existing.write_bytes(b"not touched")
    for vector, words in ((existing, "vector output exists"), (tmp_path / "roads.shp", ".gpkg")):
        proc = _torchrun("segment", src, "-o", tmp_path / "two.tif", "-c", tiny_ckpt,
                         "--tile", "64", "--vector", vector, timeout=240)
        assert proc.returncode != 0, proc.stdout
        assert f"crossearth: error: {vector}: " in proc.stderr and words in proc.stderr
        assert "/crossearth_cli/" not in proc.stderr  # torchrun's own traceback, none of ours
        assert not (tmp_path / "two.tif").exists()
        assert not list(tmp_path.glob("*part*")) and not list(tmp_path.glob(".*part*"))
    assert existing.read_bytes() == b"not touched"


def test_stale_row_parts_are_removed_by_the_next_run(tmp_path):
    """Row parts of a scene split across torchrun ranks are hidden files; an interrupted job
    left them (and its dead writers' temporaries and locks) for good. A run that takes the
    output removes them; a rank of a new job keeps its fellow ranks' parts of its own count."""
    from crossearth_cli.raster.writer import (
        TEMP_SUFFIX,
        lock_path_for,
        part_path,
        remove_stale_parts,
    )

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a pid now gone

    def left_by_a_killed_job(folder):
        folder.mkdir()
        final = folder / "scene_classes.tif"
        made = {"p0": part_path(final, 0, 2), "p1": part_path(final, 1, 2),
                "p3": part_path(final, 2, 3)}
        made["tmp"] = part_path(final, 0, 3).with_name(
            f".{part_path(final, 0, 3).name}.{dead}.0a1b2c3d{TEMP_SUFFIX}")
        made["lock"] = lock_path_for(made["p1"])
        for p in made.values():
            p.write_bytes(b"x")
        (folder / "other.tif").write_bytes(b"x")  # not ours to touch
        return final, made

    final, made = left_by_a_killed_job(tmp_path / "single")
    removed = remove_stale_parts(final)
    assert sorted(removed) == sorted(made.values())
    assert sorted(p.name for p in final.parent.iterdir()) == ["other.tif"]

    final, made = left_by_a_killed_job(tmp_path / "rank0")
    remove_stale_parts(final, job=(0, 2))  # rank 0 of a new two-rank job
    left = sorted(p.name for p in final.parent.iterdir())
    assert left == sorted(["other.tif", made["p1"].name, made["lock"].name])


def test_row_part_names_stay_short_enough_for_their_temporaries():
    """An output name of ~210 characters worked in one process but not under torchrun: a
    part's temporary adds ~53 characters and passed the file system's 255."""
    from crossearth_cli.raster.writer import part_path, temp_path_for

    for n in (10, 150, 151, 210, 250):
        final = Path("/x") / ("n" * (n - 4) + ".tif")
        part = part_path(final, 3, 8)
        assert len(temp_path_for(part).name) <= 255, n
        assert part != part_path(Path("/x") / ("m" * (n - 4) + ".tif"), 3, 8)
    assert part_path(Path("/x/a.tif"), 0, 2).name == ".a.tif.part000-of-002.tif"
    # the limit is in bytes: 118 "é" (236 bytes) make a valid output name whose part was not
    # cut (it counted 130 characters) and passed 255 bytes
    final = Path("/x") / ("é" * 118 + "_classes.tif")
    assert len(final.name.encode()) <= 255
    part = part_path(final, 3, 8)
    assert len(part.name.encode()) <= 255 and len(temp_path_for(part).name.encode()) <= 255


@pytest.mark.parametrize("holder", ["single", "job"])
def test_a_torchrun_job_and_a_single_run_into_one_folder_refuse_each_other(
        tmp_path, tiny_ckpt, holder):
    """Ranks kept only their own manifest locks, so a single-process run and a torchrun job
    could run into one output folder at once (each file done twice). Both now take the
    folder's manifest lock; ranks of one job share it."""
    tiles = make_folder(tmp_path, n=2, corrupt=None)
    out = tmp_path / "out"
    out.mkdir()
    job = {"TORCHELASTIC_RUN_ID": "job-a", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    holder_env = {**os.environ, **(job if holder == "job" else {})}
    code = ("import sys, time; from pathlib import Path; "
            "from crossearth_cli.raster.writer import lock_output; "
            "lock_output(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
    hold = subprocess.Popen([sys.executable, "-c", code, str(out / "crossearth-manifest.jsonl")],
                            stdout=subprocess.PIPE, text=True, env=holder_env)
    try:
        assert hold.stdout.readline().strip() == "held"
        if holder == "single":  # rank 1 of a two-rank job starts while a single run writes
            env = {**os.environ, **job, "TORCHELASTIC_RUN_ID": "job-b", "RANK": "1",
                   "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
        else:  # a single run starts while a job writes
            env = {k: v for k, v in os.environ.items() if k not in job}
        proc = run_cli("segment", tiles, "-o", out, "-c", tiny_ckpt, "--tile", "64", env=env)
    finally:
        hold.kill()
        hold.wait()
    assert proc.returncode == 2, proc.stderr
    assert "another crossearth run" in proc.stderr and "crossearth-manifest.jsonl" in proc.stderr
    assert not list(out.rglob("*_classes.tif"))


def test_a_folder_run_with_a_bad_option_makes_no_output_folder(tmp_path):
    tiles = make_folder(tmp_path, n=1, corrupt=None)
    for bad in (["--compress", "foo"], ["--tile", "64", "--stride", "100"]):
        proc = run_cli("segment", tiles, "-o", tmp_path / "out", *bad)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("crossearth: error: ") and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_a_south_up_output_is_left_out_of_the_mosaic(tmp_path, tiny_ckpt):
    """A VRT places its sources without flipping them: a south-up raster among north-up ones
    gave a negative DstRect, a mosaic no reader could open, and exit 0. It is left out, with
    a note, like a rotated one."""
    from rasterio.transform import Affine

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        write_tif(tiles / f"n{i}.tif", random_scene(64, 64, seed=i),
                  transform=Affine(0.5, 0, 500000 + 32 * i, 0, -0.5, 5000000))
    write_tif(tiles / "s.tif", random_scene(64, 64, seed=9),
              transform=Affine(0.5, 0, 500000, 0, 0.5, 4999000))
    proc = run_cli("segment", tiles, "-o", tmp_path / "o", "-c", tiny_ckpt, "--tile", "64",
                   "--vrt", tmp_path / "m.vrt")
    assert proc.returncode == 0, proc.stderr
    assert "s_classes.tif: left out of the mosaic" in proc.stdout + proc.stderr
    with rasterio.open(tmp_path / "m.vrt") as ds:
        assert ds.read(1).shape == (64, 192)  # the three north-up files side by side


def test_outputs_of_inputs_not_given_are_told_and_left(tmp_path, capfd, ckpt):
    """An input deleted since an earlier run: its outputs stay, and the run says so (and
    lists it in --summary), so a folder kept in step with its inputs can be tidied."""
    from reliability_helpers import cli

    tiles = tmp_path / "tiles"
    (tiles / "sub").mkdir(parents=True)
    for name, seed in (("a", 1), ("b", 2)):
        write_tif(tiles / "sub" / f"{name}.tif", random_scene(48, 48, seed=seed))
    args = ("segment", tiles, "-o", tmp_path / "out", "-c", ckpt, "--tile", "48",
            "--summary", tmp_path / "s.json")
    code, out, err = cli(capfd, *args)
    assert code == 0, err
    assert "not given" not in out + err
    (tiles / "sub" / "b.tif").unlink()
    code, out, err = cli(capfd, *args)
    assert code == 0, err
    assert "outputs of 1 input(s) an earlier run finished that this run was not given " \
           "(sub/b.tif)" in " ".join((out + err).split())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["not_given"] == ["sub/b.tif"] and summary["files_skipped"] == 1
    assert (tmp_path / "out" / "sub" / "b_classes.tif").exists()


def _layers(gpkg: Path) -> dict:
    import pyogrio

    return {name: [np.asarray(f).tolist() for f in pyogrio.raw.read(gpkg, layer=name)[2:]]
            for name, _ in pyogrio.list_layers(gpkg)}


def test_a_rerun_asking_for_fewer_outputs_has_nothing_to_do(tmp_path, capfd, ckpt,
                                                            monkeypatch):
    """--confidence or --vector (with its options) dropped on a rerun: the files an earlier
    run made with these settings and more outputs are done; no model is loaded, nothing is
    rewritten, and the other outputs are left. A changed setting still redoes them."""
    from reliability_helpers import cli

    from crossearth_cli.cli.segment import _Job

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write_tif(tiles / f"{name}.tif", random_scene(96, 80, seed=seed))
    out = tmp_path / "out"
    base = ("segment", tiles, "-c", ckpt, "--tile", "48", "-o", out)
    code, _, err = cli(capfd, *base, "--confidence", "auto", "--vector", "auto",
                       "--vector-min-area", "5")
    assert code == 0, err
    made = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(_Job, "load_model", no_model)
    summary = tmp_path / "s.json"
    for fewer, more in ((["--confidence", "auto"], "vector"), ([], "confidence, vector"),
                        (["--vector", "auto", "--vector-min-area", "5"], "confidence")):
        code, _, err = cli(capfd, *base, *fewer, "--summary", summary)
        assert code == 0, err
        assert (f"note: 2 file(s) were made by an earlier run with these settings and more "
                f"outputs ({more}): nothing to do for them, and those outputs are left as they "
                "are") in " ".join(err.split()), err
        data = json.loads(summary.read_text())
        assert data["skipped"] == ["a.tif", "b.tif"] and data["files_done"] == 0, data
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()
                if p.name != "crossearth-manifest.jsonl"} == {
            k: v for k, v in made.items() if k != "crossearth-manifest.jsonl"}
    code, _, err = cli(capfd, *base, "--confidence", "auto", "--vector", "auto",
                       "--vector-min-area", "5", "--summary", summary)  # the first command
    assert code == 0 and json.loads(summary.read_text())["files_skipped"] == 2, err
    assert "more outputs" not in err
    # fewer outputs, but another vector option or setting: they are made again
    monkeypatch.undo()
    for other in (["--vector", "auto", "--vector-min-area", "7"], ["--tile", "64"]):
        code, _, err = cli(capfd, *base, *other, "--summary", summary)
        assert code == 0 and json.loads(summary.read_text())["files_done"] == 2, err
        assert "more outputs" not in err


def test_vectors_added_or_changed_later_are_made_from_the_rasters(tmp_path, capfd, ckpt,
                                                                  monkeypatch):
    """--vector added on a rerun (or its --vector-min-area changed, or a run stopped while
    vectorizing): the GeoPackages are made from the current rasters, with no model loaded,
    equal to those of a run that had --vector from the start."""
    from reliability_helpers import cli

    from crossearth_cli.cli.segment import _Job

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write_tif(tiles / f"{name}.tif", random_scene(96, 80, seed=seed))
    base = ("segment", tiles, "-c", ckpt, "--tile", "48", "--confidence", "auto")
    code, _, err = cli(capfd, *base, "-o", tmp_path / "fresh", "--vector", "auto")
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = cli(capfd, *base, "-o", out)
    assert code == 0, err
    rasters = class_outputs(out)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(_Job, "load_model", no_model)
    summary = tmp_path / "s.json"
    code, table, err = cli(capfd, *base, "-o", out, "--vector", "auto", "--summary", summary)
    assert code == 0, err
    row = table.splitlines()[-2].split("│")[1:-1]  # files done, GeoPackage only, ..., Mpx/s
    assert "GeoPackage only" in table and [c.strip() for c in row][:2] == ["2", "2"], table
    assert row[-1].strip() == "-", table  # no speed: the model did not run
    assert "--vector: 2 file(s) keep their rasters from an earlier run with these settings; " \
           "only their GeoPackages are made" in " ".join(err.split()), err
    assert class_outputs(out) == rasters  # untouched
    for name in ("a", "b"):
        assert _layers(out / f"{name}.gpkg") == _layers(tmp_path / "fresh" / f"{name}.gpkg")
    data = json.loads(summary.read_text())
    assert data["done"] == ["a.tif", "b.tif"] == data["vectors_only"], data
    assert data["files_vectors_only"] == 2 and data["pixels"] == 0, data  # nothing segmented
    code, _, err = cli(capfd, *base, "-o", out, "--vector", "auto", "--summary", summary)
    assert code == 0 and json.loads(summary.read_text())["files_skipped"] == 2, err
    # another --vector-min-area remakes the GeoPackages (it was taken as current before)
    before = _layers(out / "a.gpkg")
    code, _, err = cli(capfd, *base, "-o", out, "--vector", "auto", "--vector-min-area", "20")
    assert code == 0 and "2 file(s) keep their rasters" in " ".join(err.split()), err
    after = _layers(out / "a.gpkg")
    assert sum(len(v[0]) for v in after.values()) < sum(len(v[0]) for v in before.values())
    assert class_outputs(out) == rasters
    # a run stopped while vectorizing b: a rerun makes only b's GeoPackage
    monkeypatch.undo()
    out2 = tmp_path / "out2"
    real = _Job.vectorize

    def stop_at_b(self, spec, class_path, vec, conf):
        if class_path.name.startswith("b"):
            raise KeyboardInterrupt
        return real(self, spec, class_path, vec, conf)

    monkeypatch.setattr(_Job, "vectorize", stop_at_b)
    code, _, err = cli(capfd, *base, "-o", out2, "--vector", "auto")
    assert code == 130, err
    assert (out2 / "b_classes.tif").exists() and not (out2 / "b.gpkg").exists()
    monkeypatch.setattr(_Job, "vectorize", real)
    monkeypatch.setattr(_Job, "load_model", no_model)
    code, _, err = cli(capfd, *base, "-o", out2, "--vector", "auto", "--summary", summary)
    assert code == 0 and "1 file(s) keep their rasters" in " ".join(err.split()), err
    data = json.loads(summary.read_text())
    assert data["done"] == ["b.tif"] and data["skipped"] == ["a.tif"], data
    assert _layers(out2 / "b.gpkg") == _layers(tmp_path / "fresh" / "b.gpkg")


def test_a_scene_whose_rasters_exist_is_told_how_to_add_its_geopackage(tmp_path, capfd):
    """One scene: --vector added on a rerun is refused as any existing output is, and the
    line gives the `crossearth vectorize` command that makes the GeoPackage --vector makes."""
    import shlex

    from reliability_helpers import assert_user_error, cli, tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "named.pth",
                           classes=["background", "building", "road", "tree"])
    scene = write_tif(tmp_path / "scene.tif", random_scene(120, 100, seed=4))
    opts = ("-c", ckpt, "--tile", "48", "--confidence", "auto")
    vec = ("--vector", "auto", "--vector-min-area", "0.5")
    code, _, err = cli(capfd, "segment", scene, "-o", tmp_path / "fresh" / "s_classes.tif",
                       *opts, *vec)
    assert code == 0, err
    code, _, err = cli(capfd, "segment", scene, "-o", tmp_path / "s_classes.tif", *opts)
    assert code == 0, err
    code, _, err = cli(capfd, "segment", scene, "-o", tmp_path / "s_classes.tif", *opts, *vec)
    line = assert_user_error(code, err, "s_classes.tif", "exists", "--overwrite")
    command = line.split("make only the GeoPackage from it: ", 1)[1].removesuffix(")")
    words = shlex.split(command)
    assert words[:2] == ["crossearth", "vectorize"] and "--regularize" in words
    assert "--centerlines" in words and "--confidence" in words, words
    code, _, err = cli(capfd, *words[1:])
    assert code == 0, err
    assert _layers(tmp_path / "s.gpkg") == _layers(tmp_path / "fresh" / "s.gpkg")
    assert sum(len(v[0]) for v in _layers(tmp_path / "s.gpkg").values()) > 0


def _folder_run(capfd, *args):
    from reliability_helpers import cli

    code, _, err = cli(capfd, "segment", *args)
    return code, " ".join(err.split())


def test_outputs_of_earlier_runs_in_an_input_folder_are_left_out(tmp_path, tiny_ckpt, capfd):
    """A scene tried alone first (outputs beside it), an earlier run's output folder inside
    the input folder, its VRT mosaic: none is segmented as an image, and the run says so. A
    user's raster that only happens to be named like an output is still run."""
    tiles = tmp_path / "tiles"
    (tiles / "g0").mkdir(parents=True)
    for i in range(2):
        write_tif(tiles / "g0" / f"t{i}.tif", random_scene(40, 40, seed=i))
    write_tif(tiles / "mine_classes.tif", random_scene(40, 40, seed=5))  # not ours
    code, err = _folder_run(capfd, tiles / "g0" / "t0.tif", "-c", tiny_ckpt,
                            "--confidence", "auto")
    assert code == 0 and (tiles / "g0" / "t0_confidence.tif").exists(), err
    code, err = _folder_run(capfd, tiles, "-o", tiles / "results", "-c", tiny_ckpt,
                            "--vrt", tiles / "mosaic.vrt")
    assert code == 0, err
    assert "left out 2 raster(s) that crossearth wrote" in err, err
    with rasterio.open(tiles / "mosaic.vrt") as ds:
        assert "classes" in ds.tags()  # the mosaic carries the class names too
    # another output folder: the first run's folder, the outputs beside t0 and the mosaic
    # are all left out, and the same --vrt can be written again
    summary = tmp_path / "run.json"
    code, err = _folder_run(capfd, tiles, "-o", tmp_path / "again", "-c", tiny_ckpt,
                            "--summary", summary, "--vrt", tiles / "mosaic.vrt", "--overwrite")
    assert code == 0, err
    assert "left out 6 raster(s) that crossearth wrote" in err, err  # 2 + 3 + the mosaic
    done = sorted(json.loads(summary.read_text())["done"])
    assert done == ["g0/t0.tif", "g0/t1.tif", "mine_classes.tif"], done
    # a mosaic of an earlier version (no class names in it) is recognised by its sources
    legacy = tiles / "old.vrt"
    legacy.write_text((tiles / "mosaic.vrt").read_text().split("<Metadata>")[0]
                      + "<GeoTransform>" + (tiles / "mosaic.vrt").read_text().split(
                          "<GeoTransform>", 1)[1])
    from crossearth_cli.batch import written_by_crossearth

    assert written_by_crossearth(legacy) and not written_by_crossearth(tiles / "mine_classes.tif")
    # a folder of outputs only
    code, err = _folder_run(capfd, tiles / "results", "-o", tmp_path / "third", "-c", tiny_ckpt)
    assert code == 2 and "every raster found is an output of an earlier crossearth run" in err


@pytest.mark.parametrize("link_name", ["alias.tif", "zz_alias.tif"])  # before and after it
@pytest.mark.parametrize("via_link", [False, True])  # the folder given through a link too
def test_a_link_to_a_file_in_the_folder_is_run_once_as_the_file(tmp_path, tiny_ckpt, capfd,
                                                                 link_name, via_link):
    tiles = tmp_path / "tiles"
    (tiles / "real").mkdir(parents=True)
    write_tif(tiles / "real" / "tile.tif", random_scene(40, 40))
    (tiles / link_name).symlink_to(Path("real") / "tile.tif")
    if via_link:
        (tmp_path / "via").symlink_to(tiles)
        tiles = tmp_path / "via"
    out = tmp_path / "out"
    code, err = _folder_run(capfd, tiles, "-o", out, "-c", tiny_ckpt)
    assert code == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tif")) == \
        ["real/tile_classes.tif"]
    assert f"{tiles / link_name} is a link to {tiles / 'real' / 'tile.tif'}, which is " \
        "segmented" in err, err


def test_the_files_a_grouped_note_concerns_are_in_the_summary(tmp_path, tiny_ckpt):
    """A note told once for many files ("has no CRS") names them all in --summary, so a long
    night's tiles with guessed bands or no CRS can be found without reading every output."""
    tiles = tmp_path / "tiles"
    (tiles / "sub").mkdir(parents=True)
    names = ["a.tif", "b.tif", "sub/c.tif", "sub/d.tif", "sub/e.tif"]
    for i, name in enumerate(names):
        write_tif(tiles / name, random_scene(40, 40, seed=i), crs=None)
    write_tif(tiles / "f.tif", random_scene(40, 40, seed=9))  # has a CRS
    proc, data = segment_folder(tiles, tmp_path / "out", tiny_ckpt)
    assert proc.returncode == 0, proc.stderr
    (message, files), = [(m, f) for m, f in data["notes"].items() if "has no CRS" in m]
    assert sorted(files) == names, data["notes"]
    said = " ".join(proc.stderr.split())
    assert f"likewise for 4 more file(s) ({', '.join(files[1:4])}, ...;" in said, said


def test_failures_are_listed_once_in_a_shared_log(tmp_path, tiny_ckpt):
    """stdout and stderr in one log (``> log 2>&1``): each failure is told once, as it
    happens, and the results say how many; with stdout on its own, the results list them."""
    tiles = make_folder(tmp_path, n=4, size=48)  # tile_3.tif is damaged
    (tiles / "south" / "empty.tif").write_bytes(b"")
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    args = [sys.executable, "-m", "crossearth_cli", "segment", str(tiles), "-o", str(out),
            "-c", str(tiny_ckpt), "--tile", "64"]
    with open(log, "w") as f:
        proc = subprocess.run(args, stdout=f, stderr=f, timeout=300)
    text = log.read_text()
    assert proc.returncode == 1, text
    said = " ".join(text.split())
    assert said.count("tile_3.tif") == 1 and said.count("empty.tif") == 1, text
    assert "failed: 2 file(s), each named above with its reason" in said, text
    assert "is an empty file (0 bytes), not a raster (an interrupted copy or download? " \
           "copy it again)" in said, text
    apart = run_cli(*args[3:], "--overwrite")  # stdout alone: the failures are listed there
    assert apart.returncode == 1, apart.stderr
    listed = sorted(Path(ln.split(":")[1].strip()).name for ln in apart.stdout.splitlines()
                    if ln.startswith("failed:"))
    assert listed == ["empty.tif", "tile_3.tif"], apart.stdout


def test_a_stopped_torchrun_folder_job_says_how_far_all_ranks_got(tmp_path, tiny_ckpt):
    """SIGTERM to torchrun (it stops every rank): rank 0 tells how many files all ranks
    finished, from their manifests, and writes --summary marked interrupted (a torchrun job
    wrote none, and each rank said only "interrupted")."""
    from reliability_helpers import sigterm_when

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(6):
        write_tif(tiles / f"s{i}.tif", random_scene(700, 700, seed=i))
    out, summary = tmp_path / "out", tmp_path / "s.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "crossearth_cli", "segment", str(tiles), "-o", str(out), "-c",
           str(tiny_ckpt), "--tile", "128", "--summary", str(summary)]
    with tempfile.TemporaryDirectory(prefix="crossearth-torchrun-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        err = sigterm_when(proc, lambda: len(list(out.glob("s*_classes.tif"))) >= 2)
    said = " ".join(err.split())
    data = json.loads(summary.read_text())
    assert data["interrupted"] == "SIGTERM" and data["ranks"] == 2, data
    done = data["done"]  # as recorded: a file renamed but not yet recorded is redone later
    assert len(done) >= 1 and f"stopped (SIGTERM) after {len(done)} of 6 file(s) by 2 ranks" \
        in said, said
    assert sorted(done + data["not_run"] + [f["input"] for f in data["failed"]]) == \
        [f"s{i}.tif" for i in range(6)], data
    assert all((out / f"{Path(k).stem}_classes.tif").exists() for k in done)
