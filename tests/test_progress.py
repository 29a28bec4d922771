"""Progress where no bar is drawn (stderr a log file): a plain line per interval."""

from __future__ import annotations

from helpers import random_scene, write_tif
from reliability_helpers import cli

from crossearth_cli.cli.console import duration, tiles_line


def test_durations_and_the_tiles_line():
    assert [duration(s) for s in (0.4, 40, 89, 90, 725, 7199, 7500)] == [
        "0 s", "40 s", "89 s", "2 min", "12 min", "2 h 00 min", "2 h 05 min"]
    assert tiles_line("a.tif", 30, 120, 10.0) == \
        "a.tif: 30/120 tiles (25 %), 3.0 tiles/s, about 30 s left"
    assert tiles_line("a.tif", 120, 120, 10.0).endswith("12.0 tiles/s")  # no time left


def test_a_log_gets_progress_lines(tmp_path, capfd, ckpt, monkeypatch):
    scene = write_tif(tmp_path / "scene.tif", random_scene(200, 200))
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "a.tif",
                       "--tile", "64")
    assert code == 0 and "progress:" not in err, err  # a short run: under a minute, none
    monkeypatch.setenv("CROSSEARTH_PROGRESS_SECONDS", "0.000001")
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "b.tif",
                       "--tile", "64", "--batch-size", "1")
    lines = [ln for ln in err.splitlines() if ln.startswith("progress: ")]
    assert code == 0 and len(lines) >= 3, err
    assert lines[0].startswith("progress: scene.tif: ") and "tiles (" in lines[0], lines
    assert "tiles done in" in lines[-1] and lines[-1].endswith("finishing the outputs"), lines
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        write_tif(tiles / f"t{i}.tif", random_scene(100, 100, seed=i))
    code, _, err = cli(capfd, "segment", tiles, "-c", ckpt, "-o", tmp_path / "out",
                       "--tile", "64", "--batch-size", "1")
    lines = [ln for ln in err.splitlines() if ln.startswith("progress: ")]
    assert code == 0 and any(ln.startswith("progress: 3 of 3 files, ") for ln in lines), err
    assert any("now t1.tif: " in ln and " tiles" in ln for ln in lines), lines
    monkeypatch.setenv("CROSSEARTH_PROGRESS_SECONDS", "0")  # off
    code, _, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "c.tif",
                       "--tile", "64", "--batch-size", "1")
    assert code == 0 and "progress:" not in err, err
