"""Folders of small scenes share forward passes (batch.run_batch → Session.run_group).

A folder of single-tile crops would otherwise run every forward pass on one tile. The groups
must give each file exactly the outputs it gets alone (16-bit files each with their own value
range too), keep files whose tiles differ (shape, pixel type) or that fill a batch by
themselves apart, and fail, interrupt and resume file by file.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from helpers import per_pixel_spec, random_scene, write_tif

from crossearth_cli.batch import Manifest, expand_inputs, run_batch
from crossearth_cli.engine import SegmentSettings, Session, segment
from crossearth_cli.raster.writer import TEMP_SUFFIX


class Counting(torch.nn.Module):
    """Records the batch size of every forward pass; can fail on chosen calls."""

    def __init__(self, inner: torch.nn.Module, fail_on: dict[int, BaseException] | None = None):
        super().__init__()
        self.inner, self.fail_on, self.calls = inner, fail_on or {}, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        exc = self.fail_on.get(len(self.calls))
        if exc is not None:
            raise exc
        return self.inner(x)


def mixed_folder(root):
    """In path order: seven single-tile 64² uint8 files, one 200² file (16 tiles of 64), two
    single-tile uint16 files (each with its own value range), one 48×64 file."""
    tiles = root / "tiles"
    tiles.mkdir()
    for i in range(7):
        write_tif(tiles / f"a_{i}.tif", random_scene(64, 64, seed=i))
    write_tif(tiles / "b_big.tif", random_scene(200, 200, seed=10))
    for i in range(2):
        data = random_scene(64, 64, seed=20 + i).astype(np.uint16) * (40 + 30 * i)
        write_tif(tiles / f"c_u16_{i}.tif", data)
    write_tif(tiles / "d_small.tif", random_scene(48, 64, seed=30))
    return tiles


def run_folder(tiles, out, spec, batch=4, **settings):
    template = SegmentSettings(input=tiles, output=out / "x.tif", device="cpu", tile=64,
                               stride=48, **settings)
    with Session(spec, "cpu", "fp32", batch) as session:
        return run_batch(expand_inputs([str(tiles)]), out, template, session,
                         ["classes", "confidence"], "test", Manifest(out))


def outputs(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_small_files_share_batches_and_get_the_outputs_they_get_alone(tmp_path):
    tiles = mixed_folder(tmp_path)
    spec = per_pixel_spec(crop=64, stride=48)
    counting = Counting(spec.module)
    spec.module = counting
    result = run_folder(tiles, tmp_path / "out", spec, confidence=tmp_path / "c.tif")
    assert len(result.done) == 11 and not result.failed
    # 4 + 3 small uint8 files, the big file alone (16 tiles in batches of 4), the two uint16
    # files together (each stretched by its own range), the 48×64 file (its own tile shape)
    assert counting.calls == [4, 3, 4, 4, 4, 4, 2, 1]

    spec.module = counting.inner
    for src in sorted(tiles.iterdir()):
        alone = tmp_path / "alone" / f"{src.stem}_classes.tif"
        segment(SegmentSettings(input=src, output=alone, confidence=alone.with_name(
            f"{src.stem}_confidence.tif"), device="cpu", tile=64, stride=48, batch_size=4),
            spec)
        for kind in ("classes", "confidence"):
            with rasterio.open(tmp_path / "out" / f"{src.stem}_{kind}.tif") as got, \
                    rasterio.open(alone.with_name(f"{src.stem}_{kind}.tif")) as want:
                assert np.array_equal(got.read(), want.read()), (src.name, kind)
                assert got.transform == want.transform and got.crs == want.crs


def test_a_failing_file_leaves_its_group_running(tmp_path):
    tiles = mixed_folder(tmp_path)
    (tiles / "a_1.tif").write_bytes(b"II*\x00" + bytes(300))  # cannot be opened
    out = tmp_path / "out"
    (out / "a_2_classes.tif").mkdir(parents=True)  # an output that cannot be written
    spec = per_pixel_spec(crop=64, stride=48)
    spec.module = counting = Counting(spec.module)
    result = run_folder(tiles, out, spec)
    assert sorted(r.input for r in result.failed) == ["a_1.tif", "a_2.tif"]
    assert len(result.done) == 9
    assert counting.calls[0] == 3  # a_0, a_3, a_4: the next good files fill the group
    assert not any(TEMP_SUFFIX in p for p in outputs(out))


def test_a_failed_forward_pass_fails_its_group_only(tmp_path):
    tiles = mixed_folder(tmp_path)
    spec = per_pixel_spec(crop=64, stride=48)
    spec.module = Counting(spec.module, fail_on={1: RuntimeError("the device fell over")})
    out = tmp_path / "out"
    result = run_folder(tiles, out, spec)
    failed = sorted(r.input for r in result.failed)
    assert failed == [f"a_{i}.tif" for i in range(4)]
    assert all("fell over" in r.reason for r in result.failed)
    assert len(result.done) == 7
    written = outputs(out)
    assert not any(p.startswith(tuple(f"a_{i}_" for i in range(4))) for p in written)
    assert not any(TEMP_SUFFIX in p for p in written)

    spec.module = spec.module.inner  # a rerun does the failed files only
    again = run_folder(tiles, out, spec)
    assert sorted(r.input for r in again.done) == failed and len(again.skipped) == 7


def test_an_interrupted_group_leaves_finished_files_only(tmp_path):
    tiles = mixed_folder(tmp_path)
    spec = per_pixel_spec(crop=64, stride=48)
    spec.module = Counting(spec.module, fail_on={2: KeyboardInterrupt()})
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_folder(tiles, out, spec)
    written = [p for p in outputs(out) if p.endswith(".tif")]
    assert written == sorted(f"a_{i}_{k}.tif" for i in range(4)
                             for k in ("classes", "confidence"))
    for p in written:
        with rasterio.open(out / p) as ds:
            ds.read()
    assert not any(TEMP_SUFFIX in p for p in outputs(out))
    records = Manifest(out).read_all()
    assert sorted(r.input for r in records if r.status == "done") == [
        f"a_{i}.tif" for i in range(4)]


def test_a_folder_of_crops_through_the_cli_with_crossearth(tmp_path, ckpt):
    """The command users type, the tiny CrossEarth: single-tile files share forward passes
    (batch 4 on the CPU) and agree with runs of each file alone. Batch composition changes
    float rounding in the last bits, as any batch size does, so near-ties may flip."""
    import json

    from helpers import run_cli

    from crossearth_cli.loading import resolve_model

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(6):
        write_tif(tiles / f"t{i}.tif", random_scene(64, 64, seed=i))
    summary = tmp_path / "run.json"
    proc = run_cli("segment", tiles, "-o", tmp_path / "out", "-c", ckpt, "--tile", "64",
                   "--stride", "48", "--summary", summary)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(summary.read_text())["files_done"] == 6
    spec = resolve_model(checkpoint=ckpt)
    agree = []
    for i in range(6):
        alone = tmp_path / "alone" / f"t{i}.tif"
        segment(SegmentSettings(input=tiles / f"t{i}.tif", output=alone, device="cpu",
                                tile=64, stride=48), spec)
        with rasterio.open(tmp_path / "out" / f"t{i}_classes.tif") as got, \
                rasterio.open(alone) as want:
            agree.append(np.mean(got.read() == want.read()))
    assert min(agree) >= 0.999, agree


def test_an_all_nodata_file_in_a_group_never_reaches_the_model(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        data = random_scene(64, 64, seed=i)
        data[data == 0] = 1  # 0 is nodata below: only file 1 is nodata throughout
        write_tif(tiles / f"a_{i}.tif", data * (i != 1), nodata=0)
    spec = per_pixel_spec(crop=64, stride=48)
    spec.module = counting = Counting(spec.module)
    out = tmp_path / "out"
    result = run_folder(tiles, out, spec)
    assert len(result.done) == 3 and counting.calls == [2]  # files 0 and 2, one pass
    with rasterio.open(out / "a_1_classes.tif") as ds:
        assert (ds.read(1) == ds.nodata).all()
    with rasterio.open(out / "a_2_classes.tif") as ds:
        assert (ds.read(1) != ds.nodata).all()


def test_out_of_memory_in_a_group_halves_the_batch_and_keeps_each_files_range(tmp_path):
    """16-bit files with their own value ranges in one pass; out of memory halves the batch
    and retries the same tiles, each still stretched by its own scene's range."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        data = random_scene(64, 64, seed=40 + i).astype(np.uint16) * (30 + 40 * i)
        write_tif(tiles / f"u{i}.tif", data)
    spec = per_pixel_spec(crop=64, stride=48)
    spec.module = counting = Counting(spec.module, fail_on={1: RuntimeError(
        "CUDA out of memory (simulated)")})
    out = tmp_path / "out"
    result = run_folder(tiles, out, spec)
    assert len(result.done) == 3 and not result.failed
    assert counting.calls == [3, 1, 1, 1]  # the pass of 3 failed, then one tile at a time

    spec.module = counting.inner
    for i in range(3):
        alone = tmp_path / "alone" / f"u{i}.tif"
        segment(SegmentSettings(input=tiles / f"u{i}.tif", output=alone, device="cpu",
                                tile=64, stride=48), spec)
        with rasterio.open(out / f"u{i}_classes.tif") as got, rasterio.open(alone) as want:
            assert np.array_equal(got.read(), want.read()), i


def test_a_group_hands_every_file_to_its_writers_before_committing_any(tmp_path, monkeypatch):
    """The members' compression runs side by side: all their rows are written (handed to
    their writer threads) before the first file is committed, which waits for its writes."""
    from crossearth_cli.raster.writer import GeoTiffSink

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(4):
        write_tif(tiles / f"a_{i}.tif", random_scene(64, 64, seed=i))
    events = []
    write_rows, commit = GeoTiffSink.write_rows, GeoTiffSink.commit

    def logged_write(self, y, rows):
        events.append(("write", self.final.name))
        return write_rows(self, y, rows)

    def logged_commit(self):
        events.append(("commit", self.final.name))
        return commit(self)

    monkeypatch.setattr(GeoTiffSink, "write_rows", logged_write)
    monkeypatch.setattr(GeoTiffSink, "commit", logged_commit)
    result = run_folder(tiles, tmp_path / "out", per_pixel_spec(crop=64, stride=48))
    assert len(result.done) == 4 and not result.failed
    kinds = [kind for kind, _ in events]
    assert kinds == ["write"] * 8 + ["commit"] * 8, events  # classes + confidence, 4 files


def test_a_note_about_outputs_names_its_own_file_in_a_group(tmp_path, ckpt, capfd):
    """Files of one group all start before any is committed: the note that a file has no CRS
    names that file, not the last one started."""
    from reliability_helpers import cli

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    write_tif(tiles / "a_nocrs.tif", random_scene(64, 64), crs=None)
    for name in ("b_geo.tif", "c_geo.tif"):
        write_tif(tiles / name, random_scene(64, 64, seed=1))
    code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "out", "-c", ckpt,
                       "--tile", "64")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "CRS" in line]
    assert len(notes) == 1 and notes[0].startswith("note: a_nocrs.tif: "), err
