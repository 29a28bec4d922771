"""Fuzzing the CLI with damaged inputs: mutated GeoTIFFs and checkpoints (flipped bytes,
overwritten header bytes, truncation).

Whatever the damage, ``crossearth segment`` either succeeds (with a complete, readable output)
or exits 2 with one ``crossearth: error:`` line. It never hangs (each case runs in a worker
process with a time limit), never crashes otherwise, and never leaves a file under the output
name, a temporary or a lock behind. About 25 cases per seed kind keep the file under ~90 s.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import rasterio
from helpers import random_scene, write_tif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import CliWorker, error_lines, tiny_checkpoint

CASE_TIMEOUT = 60  # seconds; a good case takes well under 2

FUZZ = settings(max_examples=25, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def worker():
    w = CliWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seeds")
    out = {
        "tiled-deflate": write_tif(d / "tiled.tif", random_scene(48, 40), nodata=0,
                                   compress="deflate"),
        "strips": write_tif(d / "strips.tif", random_scene(40, 36), tiled=False),
        "float32-lzw": write_tif(d / "float.tif", random_scene(32, 40).astype("float32"),
                                 compress="lzw", predictor=3),
    }
    out["scene"] = out["tiled-deflate"]
    ckpt = d / "ckpt"
    ckpt.mkdir()
    out["zip"] = tiny_checkpoint(ckpt / "tiny.pth", num_classes=3)
    import torch

    from crossearth_cli.model.random_init import (
        random_state_dict,
        tiny_config,
        write_random_checkpoint,
    )

    config = tiny_config(num_classes=3)
    torch.save({"state_dict": random_state_dict(config)}, ckpt / "legacy.pth",
               _use_new_zipfile_serialization=False)
    out["legacy"] = ckpt / "legacy.pth"
    out["safetensors"] = write_random_checkpoint(ckpt / "tiny.safetensors", config,
                                                 fmt="safetensors")
    return out


@st.composite
def damage(draw):
    """A way to damage a file of any size: applied by :func:`apply_damage`."""
    kind = draw(st.sampled_from(["flip", "flips", "header", "truncate", "truncate+flip"]))
    return kind, draw(st.randoms(use_true_random=False))


def _structure(data: bytes) -> tuple[int, int]:
    """Where the file's structure lives (IFD of a TIFF, pickle of a torch zip, header of a
    safetensors file): most random flips there change what is parsed, not just pixel values."""
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        fmt = "<I" if data[:2] == b"II" else ">I"
        ifd = struct.unpack_from(fmt, data, 4)[0]
        return max(0, ifd - 64), min(len(data), ifd + 600)
    if data[:2] == b"PK":
        return 0, min(len(data), 30_000)
    if len(data) > 8 and data[8:9] == b"{":
        return 0, min(len(data), 8 + int.from_bytes(data[:8], "little"))
    return 0, min(len(data), 20_000)


def apply_damage(data: bytes, how) -> bytes:
    kind, rnd = how
    b = bytearray(data)
    lo, hi = _structure(data)
    if kind.startswith("truncate"):
        cut = rnd.randrange(0, len(b)) if rnd.random() < 0.5 else rnd.randrange(lo, hi)
        b = b[:cut]
    if kind in ("flip", "flips", "truncate+flip") and b:
        n = 1 if kind != "flips" else rnd.randint(2, 40)
        for _ in range(n):
            where = rnd.randrange(lo, min(hi, len(b))) if rnd.random() < 0.7 and hi <= len(b) \
                else rnd.randrange(len(b))
            b[where] ^= 1 << rnd.randrange(8)
    if kind == "header" and b:
        for _ in range(rnd.randint(1, 6)):
            where = rnd.randrange(min(len(b), 512))
            b[where] = rnd.randrange(256)
    return bytes(b)


def check_outcome(code, stdout: str, stderr: str, out_dir: Path, outputs: list[Path]) -> None:
    assert not str(code).startswith("crash"), f"{code}\n{stderr}"
    assert code in (0, 2), (code, stderr)
    assert "Traceback" not in stderr, stderr
    left = sorted(p.name for p in out_dir.iterdir())
    if code == 0:
        for p in outputs:  # complete and readable
            with rasterio.open(p) as ds:
                ds.read()
        assert sorted(left) == sorted(p.name for p in outputs), left
    else:
        lines = error_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith("crossearth: error: "), stderr
        assert left == [], f"left behind: {left}"


_counter = iter(range(10**9))


def _case_dir(base: Path) -> Path:
    d = base / f"case{next(_counter)}"
    d.mkdir()
    return d


@FUZZ
@given(seed=st.sampled_from(["tiled-deflate", "strips", "float32-lzw"]), how=damage())
def test_damaged_geotiffs(tmp_path_factory, worker, seeds, seed, how):
    d = _case_dir(tmp_path_factory.getbasetemp())
    src = d / "in.tif"
    src.write_bytes(apply_damage(seeds[seed].read_bytes(), how))
    out_dir = d / "out"
    out_dir.mkdir()
    outputs = [out_dir / "c.tif", out_dir / "c_confidence.tif"]
    code, stdout, stderr = worker.run(
        ["segment", src, "-c", seeds["zip"], "-o", outputs[0], "--tile", "32",
         "--confidence", "auto"], timeout=CASE_TIMEOUT)
    check_outcome(code, stdout, stderr, out_dir, outputs)


@FUZZ
@given(seed=st.sampled_from(["zip", "legacy", "safetensors"]), how=damage())
def test_damaged_checkpoints(tmp_path_factory, worker, seeds, seed, how):
    d = _case_dir(tmp_path_factory.getbasetemp())
    ckpt = d / seeds[seed].name
    ckpt.write_bytes(apply_damage(seeds[seed].read_bytes(), how))
    out_dir = d / "out"
    out_dir.mkdir()
    outputs = [out_dir / "c.tif"]
    code, stdout, stderr = worker.run(
        ["segment", seeds["scene"], "-c", ckpt, "-o", outputs[0], "--tile", "32"],
        timeout=CASE_TIMEOUT)
    check_outcome(code, stdout, stderr, out_dir, outputs)


def test_the_worker_catches_a_hang(tmp_path, worker, seeds, ckpt):
    """The time limit is real: a case that does not answer fails the test instead of
    blocking the suite. (The case must take far longer than the limit: a refusal that takes
    a few ms could answer while this process waits for the CPU on a busy machine.)"""
    with pytest.raises(AssertionError, match="hang"):
        worker.run(["segment", seeds["scene"], "-c", ckpt, "-o", tmp_path / "h.tif",
                    "--tile", "32"], timeout=0.001)
    assert worker.run(["--version"], timeout=60)[0] == 0  # a fresh worker took over


def test_undamaged_seeds_succeed(tmp_path, worker, seeds):
    """The seeds themselves are good inputs: what the damage breaks was working."""
    cases = [(seeds[name], seeds["zip"]) for name in ("tiled-deflate", "strips", "float32-lzw")]
    cases += [(seeds["scene"], seeds[name]) for name in ("legacy", "safetensors")]
    for i, (src, ckpt) in enumerate(cases):
        out = tmp_path / f"{i}.tif"
        code, _, stderr = worker.run(["segment", src, "-c", ckpt, "-o", out, "--tile", "32"],
                                     timeout=CASE_TIMEOUT)
        assert code == 0, stderr
        with rasterio.open(out) as ds:
            assert (ds.read(1) < 3).any()
