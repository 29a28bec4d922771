"""Paths users have: odd names, links, read-only or full disks, two runs at once
(docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import random_scene, write_tif
from reliability_helpers import (
    assert_nothing_written,
    assert_user_error,
    cli,
    error_lines,
    hidden_leftovers,
    real_env,
    snapshot,
)

from crossearth_cli.model.random_init import tiny_config, write_random_checkpoint
from crossearth_cli.raster import writer as writer_mod


@pytest.fixture()
def scene(tmp_path) -> Path:
    return write_tif(tmp_path / "scene.tif", random_scene(96, 80))


def valid_raster(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


# -- names ------------------------------------------------------------------------------------


def test_spaces_and_non_ascii_names(tmp_path, capfd, ckpt):
    folder = tmp_path / "my scenes" / "été 東京"
    folder.mkdir(parents=True)
    src = write_tif(folder / "scène 1 (copy).tif", random_scene(64, 72))
    out = tmp_path / "sorties ü" / "résultat 1.tif"
    code, stdout, err = cli(capfd, "segment", src, "-c", ckpt, "-o", out, "--tile", "64",
                            "--confidence", "auto", "--vector", "auto")
    assert code == 0, err
    assert valid_raster(out).shape == (1, 64, 72)
    assert (out.parent / "résultat 1_confidence.tif").exists()
    assert (out.parent / "résultat 1.gpkg").exists()
    # a folder of them: outputs mirror the odd names, and a rerun skips them all
    write_tif(tmp_path / "my scenes" / "naïve ñ.tif", random_scene(64, 64, seed=1))
    outdir = tmp_path / "résultats 2"
    for expect_done in (2, 0):
        summary = tmp_path / f"s{expect_done}.json"
        code, _, err = cli(capfd, "segment", tmp_path / "my scenes", "-o", outdir, "-c", ckpt,
                           "--tile", "64", "--summary", summary)
        assert code == 0, err
        assert json.loads(summary.read_text())["files_done"] == expect_done
    assert sorted(p.relative_to(outdir).as_posix() for p in outdir.rglob("*.tif")) == [
        "naïve ñ_classes.tif", "été 東京/scène 1 (copy)_classes.tif"]
    assert not hidden_leftovers(tmp_path)


def test_brackets_in_names_are_names_not_patterns_or_styles(tmp_path, capfd, ckpt,
                                                           monkeypatch):
    """"town[red].tif" names a file: not a glob character class (which matched nothing), and
    not console markup (which printed "town.tif", and crashed on "[/...]")."""
    folder = tmp_path / "data[2024]"
    folder.mkdir()
    write_tif(folder / "town[red].tif", random_scene(64, 64))
    write_tif(folder / "a[1].tif", random_scene(64, 64, seed=1))
    (folder / "d[").mkdir()
    (folder / "d[" / "bad].tif").write_bytes(b"II*\x00 not a raster")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capfd, "segment", "data[2024]/town[red].tif", "-c", ckpt, "-o",
                         "o/town[red].tif", "--tile", "64", "--confidence", "auto")
    assert code == 0, err
    assert out.startswith("o/town[red].tif + o/town[red]_confidence.tif: 64x64 px"), out
    assert valid_raster(tmp_path / "o" / "town[red].tif").shape == (1, 64, 64)
    # a pattern below a folder whose name has brackets; the broken file is named in full
    code, out, err = cli(capfd, "segment", "data[2024]/**/*.tif", "-c", ckpt, "-o", "b",
                         "--tile", "64")
    assert code == 1, err
    assert sorted(p.relative_to(tmp_path / "b").as_posix()
                  for p in (tmp_path / "b").rglob("*.tif")) == [
        "a[1]_classes.tif", "town[red]_classes.tif"]
    # (a TIFF signature, then text read as the directory's offset)
    assert "failed: data[2024]/d[/bad].tif: is truncated or corrupt: its header points to " \
        "byte 1,953,459,744 but the file has 17 bytes" in out, out
    # a folder of them, and a pattern that matches nothing is still a pattern
    code, out, err = cli(capfd, "segment", "data[2024]", "-c", ckpt, "-o", "f", "--tile", "64")
    assert code == 1 and "d[/bad].tif" in out + err, err
    code, _, err = cli(capfd, "segment", "data[2024]/x[12].tif", "-c", ckpt, "-o", "n")
    assert_user_error(code, err, "data[2024]/x[12].tif", "matches no files")


# -- links --------------------------------------------------------------------------------------


def test_symlink_loops_and_dangling_links_in_a_batch_folder(tmp_path, capfd, ckpt):
    """Folder loops are covered by test_batch.py; here: links to files that loop or lead
    nowhere. They fail with a clear reason, the rest of the folder is done, exit code 1."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "good.tif", random_scene(64, 64))
    (tiles / "loop_a.tif").symlink_to(tiles / "loop_b.tif")
    (tiles / "loop_b.tif").symlink_to(tiles / "loop_a.tif")
    (tiles / "gone.tif").symlink_to(tiles / "deleted.tif")
    (tiles / "again").symlink_to(tiles, target_is_directory=True)
    summary = tmp_path / "s.json"
    code, stdout, err = cli(capfd, "segment", tiles, "-o", tmp_path / "out", "-c", ckpt,
                            "--tile", "64", "--summary", summary)
    assert code == 1, err
    assert "Traceback" not in err and "Traceback" not in stdout
    data = json.loads(summary.read_text())
    assert data["done"] == ["good.tif"]
    reasons = {f["input"]: f["reason"] for f in data["failed"]}
    assert set(reasons) == {"gone.tif", "loop_a.tif", "loop_b.tif"}
    assert all("leads nowhere" in r for r in reasons.values()), reasons
    assert not hidden_leftovers(tmp_path)


def test_output_that_is_the_input_through_a_link(tmp_path, capfd, ckpt, scene):
    before = scene.read_bytes()
    (tmp_path / "alias.tif").symlink_to(scene)
    os.link(scene, tmp_path / "hard.tif")
    for out in (tmp_path / "alias.tif", tmp_path / "hard.tif"):
        code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", out, "--overwrite")
        assert_user_error(code, err, "input file itself")
    assert scene.read_bytes() == before
    assert not hidden_leftovers(tmp_path)


# -- folders we cannot write ------------------------------------------------------------------


def test_read_only_output_folder_simulated(tmp_path, capfd, ckpt, scene, monkeypatch):
    """Tests run as root, who ignores permission bits: the folder refuses file creation as a
    read-only one would (EACCES from open)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if Path(file).parent == ro:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(writer_mod, "open", refusing_open, raising=False)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", ro / "out.tif")
    assert_user_error(code, err, "cannot write in the output folder", "permission denied")
    assert_nothing_written(tmp_path, before)
    # a report in that folder is named as what it is, not as the output folder
    for option in ("--summary", "--vrt"):
        code, _, err = cli(capfd, "segment", scene, scene.parent, "-c", ckpt, "-o",
                           tmp_path / "outs", option, ro / "report")
        assert_user_error(code, err, f"cannot write in the folder of {option}")
    assert_nothing_written(tmp_path, before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_chmod(tmp_path, capfd, ckpt, scene):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", ro / "out.tif")
        assert_user_error(code, err, "cannot write")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(stat.S_IRWXU)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    return proc.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_file_system_even_for_root(tmp_path, capfd, ckpt, scene):
    """A read-only mount stops root too (EROFS). Needs root and mount rights: skipped
    elsewhere (the simulated test above covers the same path)."""
    ro = tmp_path / "rofs"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", ro / "out.tif")
        assert_user_error(code, err, "cannot write in the output folder", "read-only")
    finally:
        _umount(ro)


# -- full disk -----------------------------------------------------------------------------------


def _fail_second_write(monkeypatch, exc_factory):
    calls = []
    real = rasterio.io.DatasetWriter.write

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise exc_factory(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", write)
    return calls


def test_disk_full_while_writing(tmp_path, capfd, ckpt, monkeypatch):
    """ENOSPC on a block write (the second one: a partly written temporary exists)."""
    src = write_tif(tmp_path / "big.tif", random_scene(1100, 300))
    calls = _fail_second_write(
        monkeypatch, lambda name: OSError(errno.ENOSPC, "No space left on device", name))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "out.tif",
                       "--tile", "128", "--confidence", "auto")
    line = assert_user_error(code, err, "no space left")
    assert "out.tif" in line or "out_confidence.tif" in line  # names the file it was writing
    assert len(calls) >= 2
    assert_nothing_written(tmp_path, before)


def test_disk_full_as_gdal_reports_it(tmp_path, capfd, ckpt, monkeypatch):
    """GDAL says only "Write failed" (libtiff prints the ENOSPC text itself): the free space
    of the folder tells us the disk is full."""
    from rasterio.errors import RasterioIOError

    src = write_tif(tmp_path / "big.tif", random_scene(1100, 300))
    _fail_second_write(
        monkeypatch, lambda name: RasterioIOError("Write failed. See previous exception for "
                                                  "details."))
    real_statvfs = os.statvfs

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(writer_mod.os, "statvfs",
                        lambda p: Full() if Path(p) == tmp_path else real_statvfs(p))
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", tmp_path / "out.tif",
                       "--tile", "128")
    assert_user_error(code, err, "no space left")
    assert_nothing_written(tmp_path, before)


def test_disk_full_when_recording_the_manifest(tmp_path, capfd, ckpt, monkeypatch):
    """A full disk outside the raster writer (here the batch manifest) is one line too; the
    outputs already renamed are complete, and the next run recomputes what is not recorded."""
    from crossearth_cli import batch

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "a.tif", random_scene(64, 64))

    def full(self, rec):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(batch.Manifest, "append", full)
    code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "out", "-c", ckpt, "--tile",
                       "64")
    assert_user_error(code, err, "crossearth-manifest.jsonl", "no space left")
    for p in (tmp_path / "out").glob("*.tif"):
        valid_raster(p)
    assert not hidden_leftovers(tmp_path)


@pytest.mark.parametrize("where", ["manifest", "summary", "mosaic"])
def test_a_full_disk_says_which_file_for_every_output(tmp_path, capfd, ckpt, monkeypatch, where):
    """A plain write's ENOSPC names no file: the line still names the manifest, summary or
    mosaic that was being written, and no temporary of it is left."""
    from crossearth_cli import batch

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in ("a.tif", "b.tif"):
        write_tif(tiles / name, random_scene(64, 64))
    no_space = OSError(errno.ENOSPC, "No space left on device")
    if where == "manifest":
        monkeypatch.setattr(batch.os, "fsync", lambda fd: (_ for _ in ()).throw(no_space))
    name = {"manifest": "crossearth-manifest.jsonl", "summary": "s.json",
            "mosaic": "mosaic.vrt"}[where]
    if where != "manifest":
        real = Path.write_text

        def write_text(self, text, *args, **kwargs):  # the temporary of that output only
            if self.name.startswith(f".{name}."):
                raise no_space
            return real(self, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "out", "-c", ckpt,
                       "--summary", tmp_path / "s.json", "--vrt", tmp_path / "out" / "mosaic.vrt")
    assert_user_error(code, err, name, "no space left")
    assert not hidden_leftovers(tmp_path)


def test_really_full_disk(tmp_path, ckpt):
    """A 300 KB tmpfs as the output folder (needs root and mount rights; skipped elsewhere).
    GDAL's TIFF library may print its own 'No space left on device' line first; our line is
    the last, and nothing is left under a final name."""
    full = tmp_path / "full"
    if not _mount_tmpfs(full, "size=300k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        src = write_tif(tmp_path / "noise.tif",
                        np.random.default_rng(0).integers(0, 255, (3, 600, 600), np.uint8))
        from helpers import run_cli

        proc = run_cli("segment", src, "-c", ckpt, "-o", full / "out.tif", "--tile", "128",
                       "--probabilities", "auto", "--probabilities-dtype", "float32",
                       "--compress", "none", env=real_env())
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        last = error_lines(proc.stderr)[-1]
        assert last.startswith("crossearth: error: ") and "no space left" in last, last
        assert [p.name for p in full.iterdir()] == []
    finally:
        _umount(full)


def test_really_full_disk_with_a_small_scene(tmp_path, ckpt):
    """A scene small enough for GDAL to hold all its blocks until the file is closed: the
    writes that fail then are not raised by rasterio. They must still fail the run (they left
    unreadable rasters under their final names, with exit 0), as a COG and in a folder run
    too (whose manifest must not record a broken file as done). Needs mount rights."""
    full = tmp_path / "full"
    if not _mount_tmpfs(full, "size=300k"):
        pytest.skip("cannot mount a tmpfs here")
    from helpers import run_cli

    src = Path(__file__).parent.parent / "sample_data" / "rgbn_town.tif"  # 515×403
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / src.name).write_bytes(src.read_bytes())
    extra = ("-c", ckpt, "--confidence", "auto", "--probabilities", "auto")
    runs = [(("segment", src, "-o", full / "x.tif") + extra, 2),
            (("segment", src, "-o", full / "x.tif", "--cog") + extra, 2),
            (("segment", tiles, "-o", full / "batch") + extra, 1)]  # 1: a file failed
    try:
        for args, code in runs:
            proc = run_cli(*args, env=real_env())
            assert proc.returncode == code, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
            if code == 2:
                last = error_lines(proc.stderr)[-1]
                assert last.startswith("crossearth: error: ") and "no space left" in last, last
            else:
                said = proc.stdout + proc.stderr
                assert "rgbn_town.tif:" in said and "no space left" in said, said
            for tif in full.rglob("*.tif"):  # what is left is complete
                valid_raster(tif)
            assert not (full / "x.tif").exists()  # the classes are committed last
            for manifest in full.rglob("crossearth-manifest*.jsonl"):
                assert '"done"' not in manifest.read_text()
            assert not hidden_leftovers(full)
            for p in sorted(full.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
    finally:
        _umount(full)


def test_blocks_lost_at_close_fail_the_run(tmp_path, capfd, ckpt, scene, monkeypatch):
    """Anywhere, without a tmpfs: a close that loses the last block without raising (what
    GDAL does on a full disk, as rasterio passes it on) is caught before the rename."""
    real_close = rasterio.io.DatasetWriter.close

    def close_losing_the_end(self):
        name = self.name
        real_close(self)
        if name.endswith(writer_mod.TEMP_SUFFIX):
            os.truncate(name, os.path.getsize(name) - 1)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "close", close_losing_the_end)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "out.tif",
                       "--tile", "64")
    assert_user_error(code, err, "out.tif", "write failed")
    assert_nothing_written(tmp_path, before)


def test_block_map_marks_the_blocks_that_hold_data():
    """Which blocks a write fills with something other than nodata: those must be on disk."""
    from rasterio.windows import Window

    b = writer_mod.BLOCK
    holds = np.zeros((2, 2, 3), dtype=bool)
    data = np.full((2, 10, 2 * b), 255, dtype=np.uint8)  # rows b-10..b, columns b/2..5b/2
    data[0, :, 0] = 1  # band 1, block column 0
    data[1, :, -1] = 7  # band 2, block column 2
    writer_mod._note_blocks(holds, data, Window(b // 2, b - 10, 2 * b, 10), 255)
    assert holds[0].nonzero() == ([0], [0]) and holds[1].nonzero() == ([0], [2])
    floats = np.full((1, b + 1, 4), np.nan, dtype=np.float32)
    floats[0, -1, 0] = 0.5  # NaN is nodata: only the second block row holds data
    holds = np.zeros((1, 2, 1), dtype=bool)
    writer_mod._note_blocks(holds, floats, Window(0, 0, 4, b + 1), float("nan"))
    assert holds[:, :, 0].tolist() == [[False, True]]
    zeros = np.zeros((1, 4, 4), dtype=np.uint8)  # no nodata: zeros are what GDAL leaves out
    holds = np.zeros((1, 1, 1), dtype=bool)
    writer_mod._note_blocks(holds, zeros, Window(0, 0, 4, 4), None)
    assert not holds.any()


def test_full_disk_when_taking_the_lock(tmp_path, capfd, ckpt, scene, monkeypatch):
    """The lock file's first write can meet a full disk: one line naming the output, and no
    lock file left; in a folder run the file fails with that reason, not an internal error."""
    real_write = os.write

    def write(fd, data):  # the lock of a raster output (not the folder's, for the manifest)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tif.lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", write)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "out.tif")
    assert_user_error(code, err, "out.tif", "no space left")
    assert_nothing_written(tmp_path, before)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "a.tif", random_scene(64, 64))
    code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "out", "-c", ckpt)
    assert code == 1, err
    assert "a.tif" in err and "no space left" in err and "internal error" not in err
    assert not hidden_leftovers(tmp_path)


# -- two runs, one output ---------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from crossearth_cli.raster.writer import lock_output
lock_output(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_the_same_output_is_refused_and_stale_locks_do_not_block(
        tmp_path, capfd, ckpt, scene):
    out = tmp_path / "out.tif"
    holder = _hold_lock(out)
    try:
        before = snapshot(tmp_path)
        code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", out)
        line = assert_user_error(code, err, "out.tif", "another crossearth run")
        assert f"pid {holder.pid}" in line
        assert_nothing_written(tmp_path, before)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays behind
        holder.wait(10)
    assert (tmp_path / ".out.tif.lock").exists()
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", out)
    assert code == 0, err
    valid_raster(out)
    assert not hidden_leftovers(tmp_path)  # the stale lock file was taken over and removed


def test_two_real_runs_at_once(tmp_path, capfd, ckpt):
    """A real run writing an output; a second one started meanwhile refuses at once, and the
    first finishes undisturbed."""
    src = write_tif(tmp_path / "big.tif", random_scene(1200, 1200))
    out = tmp_path / "out.tif"
    first = subprocess.Popen(
        [sys.executable, "-m", "crossearth_cli", "segment", str(src), "-c", str(ckpt), "-o",
         str(out), "--tile", "128"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=real_env())
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".out.tif.lock").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline
            time.sleep(0.02)
        t0 = time.perf_counter()
        code, _, err = cli(capfd, "segment", src, "-c", ckpt, "-o", out, "--overwrite")
        assert_user_error(code, err, "another crossearth run", f"pid {first.pid}")
        assert time.perf_counter() - t0 < 30  # refused, not queued
        stdout, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert valid_raster(out).shape == (1, 1200, 1200)
    assert not hidden_leftovers(tmp_path)


def test_second_batch_into_the_same_folder_is_refused(tmp_path, capfd, ckpt):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "a.tif", random_scene(64, 64))
    outdir = tmp_path / "out"
    outdir.mkdir()
    holder = _hold_lock(outdir / "crossearth-manifest.jsonl")
    try:
        code, _, err = cli(capfd, "segment", tiles, "-o", outdir, "-c", ckpt, "--tile", "64")
        assert_user_error(code, err, "crossearth-manifest.jsonl", "another crossearth run")
        assert not list(outdir.glob("*.tif"))
    finally:
        holder.kill()
        holder.wait(10)


# -- reports and inputs named on the command line --------------------------------------------


def test_summary_and_mosaic_never_replace_an_input_an_output_or_a_stranger(
    tmp_path, capfd, ckpt, scene
):
    """--summary and --vrt are checked with the other outputs, before any work: not over the
    input, not over another output, not a folder, not over a file crossearth did not write."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    tile = write_tif(tiles / "a.tif", random_scene(64, 64))
    write_tif(tiles / "b.tif", random_scene(64, 64, seed=1))
    precious = tmp_path / "notes.json"
    precious.write_text("precious\n")
    (tmp_path / "folder.json").mkdir()
    out = tmp_path / "o.tif"
    run = ("segment", scene, "-c", ckpt, "--tile", "64", "-o", out)
    cases = [
        (run + ("--summary", scene), "--summary names a file this run reads or writes"),
        (run + ("--summary", out, "--overwrite"), "--summary names a file this run reads"),
        (run + ("--summary", precious), "is not a crossearth summary"),
        (run + ("--summary", tmp_path / "folder.json"), "--summary is a folder"),
        (run + ("--vector", tmp_path / "v.shp"), "must be a GeoPackage"),
        (run + ("--vector-min-area", "4"), "add --vector auto"),
        (run + ("--vector", "auto", "--vector-min-area", "-1"), "--vector-min-area must be ≥ 0"),
        (("segment", tiles, "-c", ckpt, "--tile", "64", "-o", tmp_path / "out",
          "--vrt", tile), "--vrt names a file this run reads or writes"),
    ]
    before_bytes = scene.read_bytes(), tile.read_bytes()
    for args, needle in cases:
        before = snapshot(tmp_path)
        code, _, err = cli(capfd, *args)
        assert_user_error(code, err, needle)
        assert_nothing_written(tmp_path, before)
    assert (scene.read_bytes(), tile.read_bytes()) == before_bytes
    assert precious.read_text() == "precious\n"
    # its own summary is refreshed by a rerun without --overwrite (resuming needs none)
    summary = tmp_path / "s.json"
    for target in (out, tmp_path / "o2.tif"):
        code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "--tile", "64", "-o", target,
                           "--summary", summary)
        assert code == 0, err
        assert json.loads(summary.read_text())["output"] == str(target)


def test_inputs_are_checked_before_any_work(tmp_path, capfd, ckpt, scene):
    """A missing file among several, a pattern matching nothing, or an output folder holding
    every input: one line, exit 2, nothing written. A pattern for one file with -o a .tif
    runs as that file."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "a.tif", random_scene(64, 64))
    empty = tmp_path / "empty"
    empty.mkdir()
    write_random_checkpoint(tmp_path / "split.pth", tiny_config(num_classes=4), fmt="split")
    base = ("-c", ckpt, "--tile", "64")
    cases = [
        (("segment", scene, tmp_path / "typo.tif", "-o", tmp_path / "out") + base,
         "typo.tif: no such file"),
        (("segment", str(tmp_path / "nothing_*.tif"), "-o", tmp_path / "x.tif") + base,
         "matches no files"),
        (("segment", tiles, "-o", tiles) + base, "every input is inside the output folder"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--overlap", "nan") + base, "--overlap"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--overlap", "1.5") + base,
         "--overlap 1.5: give a fraction of the tile below 1 (0.33) or whole pixels (171)"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--range", "0,inf") + base, "finite"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--range", "5,1") + base,
         "--range '5,1': each maximum must exceed its minimum"),
        (("segment", scene, "-o", tmp_path / "x.png") + base, "GeoTIFFs, not .png"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--device", "gpu") + base,
         "--device 'gpu' is not a device"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--device", "mps") + base,  # was a crash
         "--device 'mps': crossearth runs on the CPU or a CUDA GPU (use auto, cpu or cuda:N)"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--confidence", tmp_path / "x.tif") + base,
         f"two outputs share one path: {tmp_path / 'x.tif'}"),
        # before the model loads, so no "RANDOM WEIGHTS" note comes first
        (("segment", scene, "-o", tmp_path / "x.tif", "--allow-random-weights", "--bands",
          "4,1,2"), "band 4 is out of range"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--stride", "100000", "-c", ckpt),
         "--stride 100000 is larger than the tile ("),
        (("segment", scene, "-o", tmp_path / "x.tif", "--overlap", "0.999") + base,
         "--overlap 0.999: overlap 0.999 leaves no stride for tile 64 (give a smaller overlap"),
        (("segment", scene, "-o", tmp_path / "x.tif", "--probabilities-dtype", "float32")
         + base, "--probabilities-dtype applies to the probabilities raster"),
        (("segment", empty, "-o", tmp_path / "x.tif") + base, "holds no rasters"),
        (("segment", scene, "-o", tmp_path / "x.tif", "-c", tmp_path / "split.pth",
          "--backbone", tmp_path / "no_backbone.pth"), "no_backbone.pth: no such file (check "
         "the path)"),
    ]
    for args, needle in cases:
        before = snapshot(tmp_path)
        code, _, err = cli(capfd, *args)
        assert_user_error(code, err, needle)
        assert_nothing_written(tmp_path, before)
    code, _, err = cli(capfd, "segment", str(tiles / "a*.tif"), "-o", tmp_path / "one.tif", *base)
    assert code == 0, err
    assert valid_raster(tmp_path / "one.tif").shape == (1, 64, 64)


def test_a_scene_whose_class_raster_fails_keeps_none_of_its_rasters(tmp_path, capfd, ckpt,
                                                                    scene, monkeypatch):
    """The confidence and probability rasters are renamed into place before the class
    raster; if the class raster then fails (a full disk, Ctrl-C during its COG conversion),
    they go again: a rerun of the same command was refused because they existed."""
    real = writer_mod.GeoTiffSink.commit

    def commit(self):
        if self.final.name == "out.tif":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(writer_mod.GeoTiffSink, "commit", commit)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "out.tif",
                       "--tile", "64", "--confidence", "auto", "--probabilities", "auto")
    assert_user_error(code, err, "no space left")
    assert_nothing_written(tmp_path, before)
    monkeypatch.setattr(writer_mod.GeoTiffSink, "commit", real)
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "out.tif",
                       "--tile", "64", "--confidence", "auto", "--probabilities", "auto")
    assert code == 0, err


def test_a_lock_file_holding_other_json_is_read_as_no_holder(tmp_path):
    """Found by the documentation audit: a lock file whose JSON is not an object (``12345``)
    crashed the refusal line with an AttributeError."""
    lock = tmp_path / ".out.tif.lock"
    for text, want in (("12345", {}), ('["a"]', {}), ('{"pid": 7}', {"pid": 7})):
        lock.write_text(text)
        assert writer_mod._holder(lock) == want
