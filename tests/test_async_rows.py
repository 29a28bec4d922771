"""Finished rows copied back without waiting (CUDA), exercised on the CPU with fake events.

On CUDA the accumulator classifies on the device, queues copies into pinned memory and hands
back rows with an event; ``_run_tiles`` waits for them only after the next batch is queued. Here
the same path is forced on the CPU (``deferred = True``) and the events are fakes that record
when they are waited for.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from helpers import per_pixel_spec, random_scene, write_tif

from crossearth_cli import engine
from crossearth_cli.engine import SegmentSettings, Session, segment
from crossearth_cli.raster import accumulator
from crossearth_cli.raster.accumulator import FinishedRows, RowBandAccumulator
from crossearth_cli.raster.windows import tile_grid
from crossearth_cli.raster.writer import GeoTiffSink


class FakeEvent:
    """Stands in for a ``torch.cuda.Event``: records each ``synchronize()``."""

    def __init__(self, log: list | None = None):
        self.log = log if log is not None else []
        self.y = None  # the rows it guards, once known
        self.waits = 0

    def synchronize(self) -> None:
        self.waits += 1
        self.log.append(("wait", self.y))


# -- FinishedRows.wait ---------------------------------------------------------------------


def test_wait_synchronizes_once_and_returns_the_rows():
    event = FakeEvent()
    rows = FinishedRows(y=0, classes=np.zeros((2, 3), np.uint8), ready=event)
    assert rows.wait() is rows
    assert event.waits == 1 and rows.ready is None
    rows.wait()
    assert event.waits == 1
    assert FinishedRows(y=0, classes=np.zeros((1, 1), np.uint8)).wait().ready is None


# -- the accumulator's device path against its chunked CPU path ------------------------------


def _drive(acc: RowBandAccumulator, h: int, w: int, tile: int, stride: int, seed: int):
    """Blend random positive scores (a few tiles skipped, some pixels invalid); all rows out."""
    rng = np.random.default_rng(seed)
    out = []
    for row in tile_grid(h, w, tile, stride):
        for t in row:
            if t.row in (1, 2):  # tile rows without data: empty rows between the others
                out += acc.add(t, None, None)
                continue
            scores = torch.from_numpy(rng.uniform(0.01, 5, (acc.num_classes, t.h, t.w)))
            valid = torch.from_numpy(rng.random((t.h, t.w)) > 0.1)
            out += acc.add(t, scores.float(), valid)
    return out + acc.finish()


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
@pytest.mark.parametrize("probabilities", [None, "uint8", "float32"])
def test_device_path_gives_the_cpu_path_rows(monkeypatch, blend, probabilities):
    """Same classes, confidence, probabilities and counts as the synchronous path; each
    rows' event comes with them and is waited for once. (The band is narrower than one CPU
    chunk: chunks may round float32 sums differently from the whole width.)"""
    events = []
    monkeypatch.setattr(accumulator, "_record_ready",
                        lambda device: events.append(FakeEvent()) or events[-1])
    h, w, tile, stride = 70, 53, 24, 16
    kw = dict(confidence=True, probabilities=probabilities)
    plain = RowBandAccumulator(h, w, 5, tile, stride, blend, **kw)
    deferred = RowBandAccumulator(h, w, 5, tile, stride, blend, **kw)
    deferred.deferred = True
    want = _drive(plain, h, w, tile, stride, seed=3)
    got = _drive(deferred, h, w, tile, stride, seed=3)
    assert [r.y for r in got] == [r.y for r in want]
    assert any(r.ready is None for r in got), "no empty rows: the scene does not test them"
    assert len(events) == sum(r.ready is not None for r in got) > 2
    for g, r in zip(got, want):
        assert r.ready is None
        assert g.wait() is g and g.ready is None
        np.testing.assert_array_equal(g.classes, r.classes)
        np.testing.assert_array_equal(g.confidence, r.confidence)
        np.testing.assert_array_equal(g.class_counts, r.class_counts)
        assert g.class_counts.dtype == np.int64
        if probabilities:
            assert g.probabilities.dtype == r.probabilities.dtype
            np.testing.assert_array_equal(g.probabilities, r.probabilities)
        else:
            assert g.probabilities is None
    assert all(e.waits == 1 for e in events)


# -- _run_tiles: deferred writing ------------------------------------------------------------


def _scene(tmp_path):
    """200×130, 2 batches per tile row, with nodata rows (skipped tiles, empty rows)."""
    img = random_scene(200, 130, seed=7)
    img[:, 30:110] = 0
    img[:, 180:] = 0
    return write_tif(tmp_path / "scene.tif", img, nodata=0)


def _segment(tmp_path, name: str):
    out = tmp_path / f"{name}_classes.tif"
    conf = tmp_path / f"{name}_confidence.tif"
    probs = tmp_path / f"{name}_probabilities.tif"
    result = segment(
        SegmentSettings(input=tmp_path / "scene.tif", output=out, confidence=conf,
                        probabilities=probs, probabilities_dtype="uint8", batch_size=3),
        per_pixel_spec(num_classes=5, crop=32, stride=24),
    )
    rasters = []
    for path in (out, conf, probs):
        with rasterio.open(path) as ds:
            rasters.append(ds.read())
    return result, rasters


@pytest.fixture
def deferred_log(monkeypatch):
    """``install()`` forces the deferred path in ``segment`` and returns a log of batches
    queued, rows emitted, waited for and written."""
    log: list[tuple] = []

    class LoggedAccumulator(RowBandAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.deferred = True

        def _emit(self, n):
            rows = super()._emit(n)
            if rows is not None:
                if rows.ready is not None:
                    rows.ready.y = rows.y
                log.append(("emit", rows.y, rows.ready is not None))
            return rows

        def finish(self):
            log.append(("finish",))
            return super().finish()

    call = engine.Predictor.__call__

    def predictor_call(self, *args, **kwargs):
        log.append(("batch",))
        return call(self, *args, **kwargs)

    write_rows = GeoTiffSink.write_rows

    def logged_write(self, y, rows):
        log.append(("write", self.final.name, y, rows.shape[-2]))
        return write_rows(self, y, rows)

    def install() -> list[tuple]:
        monkeypatch.setattr(engine, "RowBandAccumulator", LoggedAccumulator)
        monkeypatch.setattr(accumulator, "_record_ready", lambda device: FakeEvent(log))
        monkeypatch.setattr(engine.Predictor, "__call__", predictor_call)
        monkeypatch.setattr(GeoTiffSink, "write_rows", logged_write)
        return log

    return install


def test_deferred_writing_writes_every_row_once_in_order(tmp_path, deferred_log):
    _scene(tmp_path)
    want_result, want = _segment(tmp_path, "now")
    log = deferred_log()
    got_result, got = _segment(tmp_path, "later")

    # identical rasters and counts to writing each row as it is emitted
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got_result.class_pixels, want_result.class_pixels)
    assert got_result.nodata_pixels == want_result.nodata_pixels

    # every sink gets rows 0 .. 200 exactly once, in order
    writes = [e for e in log if e[0] == "write"]
    for name in ("later_classes.tif", "later_confidence.tif", "later_probabilities.tif"):
        ys = [(y, n) for _, sink, y, n in writes if sink == name]
        assert [y for y, _ in ys] == list(np.cumsum([0] + [n for _, n in ys])[:-1])
        assert sum(n for _, n in ys) == 200

    emits = [i for i, e in enumerate(log) if e[0] == "emit"]
    deferred = [i for i in emits if log[i][2]]
    assert len(deferred) >= 4 and len(deferred) < len(emits), "the scene tests too little"
    finish = log.index(("finish",))
    for i in deferred:
        y = log[i][1]
        wait = log.index(("wait", y))
        first_write = next(j for j, e in enumerate(log) if e[0] == "write" and e[2] == y)
        assert i < wait < first_write  # waited for before anything reads the arrays
        assert log.count(("wait", y)) == 1
        # held until the next batch is queued (and no longer), or written at the end
        batches = sum(e == ("batch",) for e in log[i:wait])
        assert batches == (0 if i > finish else 1), (log[i], batches)


def test_rows_that_need_no_wait_are_written_at_once(tmp_path, monkeypatch):
    """On the CPU (no events) each rows go to the sinks before the next tile is blended."""
    _scene(tmp_path)
    log = []
    add = RowBandAccumulator.add

    def logged_add(self, tile, scores, valid):
        rows = add(self, tile, scores, valid)
        log.append(("add", [r.y for r in rows]))
        return rows

    write_rows = GeoTiffSink.write_rows

    def logged_write(self, y, rows):
        if self.final.name.endswith("_classes.tif"):
            log.append(("write", y))
        return write_rows(self, y, rows)

    monkeypatch.setattr(RowBandAccumulator, "add", logged_add)
    monkeypatch.setattr(GeoTiffSink, "write_rows", logged_write)
    _segment(tmp_path, "cpu")
    for i, e in enumerate(log):
        if e[0] == "add":
            assert [w[1] for w in log[i + 1 : i + 1 + len(e[1])]] == e[1]


def test_an_error_drops_the_pending_rows(tmp_path, deferred_log, monkeypatch):
    """A failing batch: rows still pending are neither waited for nor written, no output."""
    _scene(tmp_path)
    logged = deferred_log()
    call = engine.Predictor.__call__  # the logging wrapper
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return call(self, *args, **kwargs)

    monkeypatch.setattr(engine.Predictor, "__call__", failing)
    with pytest.raises(RuntimeError, match="boom"):
        _segment(tmp_path, "failed")
    waited = {e[1] for e in logged if e[0] == "wait"}
    emitted = [e[1] for e in logged if e[0] == "emit" and e[2]]
    assert emitted and emitted[-1] not in waited
    ys = [e[2] for e in logged if e[0] == "write" and e[1] == "failed_classes.tif"]
    assert ys == sorted(ys) and emitted[-1] not in ys
    assert not (tmp_path / "failed_classes.tif").exists()


class DeviceOnly(torch.Tensor):
    """Stands in for the GPU's copy of the masks: a question whose answer the host needs
    (``all``, ``any``, ``bool``, ``item``) would make the host wait for all queued work."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.all, torch.Tensor.any, torch.Tensor.__bool__,
                    torch.Tensor.item, torch.all, torch.any):
            raise AssertionError(f"{func.__name__} asked of the device's copy of the masks")
        return super().__torch_function__(func, types, args, kwargs)


def test_no_host_question_is_asked_of_the_device_masks(tmp_path, monkeypatch):
    """Whether a batch has nodata is asked of the host's masks; the device's copy only feeds
    the model and the band. Single scenes and folder groups alike, with nodata present."""
    from crossearth_cli.batch import Manifest, expand_inputs, run_batch

    _scene(tmp_path)
    want_result, want = _segment(tmp_path, "host")
    monkeypatch.setattr(engine.Predictor, "device_masks",
                        lambda self, valid: valid.clone().as_subclass(DeviceOnly))
    got_result, got = _segment(tmp_path, "guarded")
    for a, b in zip(want, got, strict=True):  # classes, confidence, probabilities
        np.testing.assert_array_equal(a, b)
    assert got_result.tiles_skipped == want_result.tiles_skipped > 0

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(3):
        img = random_scene(64, 64, seed=i)
        img[:, : 10 * i] = 0
        write_tif(tiles / f"t{i}.tif", img, nodata=0)
    template = SegmentSettings(input=tiles, output=tmp_path / "x.tif", device="cpu")
    with Session(per_pixel_spec(crop=64, stride=48), "cpu", "fp32", 4) as session:
        result = run_batch(expand_inputs([str(tiles)]), tmp_path / "out", template, session,
                           ["classes"], "test", Manifest(tmp_path / "out"))
    assert len(result.done) == 3, result.failed


# -- copies to the device that do not wait ----------------------------------------------------


def test_uploads_to_cuda_go_through_pinned_memory_and_do_not_wait(monkeypatch):
    """A plain copy to CUDA from pageable memory waits for the GPU's queued work; ``upload``
    stages in pinned memory and queues the copy (traced here without a GPU)."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: calls.append(("pin",)) or self)
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, *a, **kw: calls.append(("to", a, kw)) or self)
    accumulator.upload(np.arange(3.0), torch.device("cuda"))
    assert calls == [("pin",), ("to", (torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    accumulator.upload([1.0, 2.0], "cpu")
    assert ("pin",) not in calls


def test_every_batch_stretch_and_scene_weight_is_uploaded(tmp_path, monkeypatch):
    """The per-batch stretch of a uint16 scene, the mean/std and the taper weights all reach
    the device through ``upload``; scenes of one tile shape share one taper, made once."""
    uploads = []
    real = accumulator.upload

    def counted(values, device, dtype=None):
        uploads.append(np.shape(values))
        return real(values, device, dtype)

    monkeypatch.setattr(accumulator, "upload", counted)
    monkeypatch.setattr(engine, "upload", counted)
    accumulator.tile_weight.cache_clear()
    img = (random_scene(96, 96, seed=3).astype(np.uint16) * 40)
    src = write_tif(tmp_path / "u16.tif", img)
    settings = dict(device="cpu", batch_size=2, overwrite=True)
    segment(SegmentSettings(input=src, output=tmp_path / "a.tif", **settings),
            per_pixel_spec(crop=64, stride=32))
    first = list(uploads)
    assert first.count((3,)) >= 2 + 2 * 2  # mean, std, then low and factor per batch (2)
    assert any(len(s) == 2 for s in first)  # the taper weights
    uploads.clear()
    segment(SegmentSettings(input=src, output=tmp_path / "b.tif", **settings),
            per_pixel_spec(crop=64, stride=32))
    assert not any(len(s) == 2 for s in uploads)  # the second scene reuses the tapers
    np.testing.assert_array_equal(rasterio.open(tmp_path / "a.tif").read(),
                                  rasterio.open(tmp_path / "b.tif").read())
