"""Checkpoint files users bring: none can run code, every bad one is one clear line
(docs/reliability.md)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import random_scene, run_cli, write_tif
from reliability_helpers import (
    assert_nothing_written,
    assert_user_error,
    cli,
    real_env,
    snapshot,
    tiny_checkpoint,
)

from crossearth_cli.model.random_init import random_state_dict, tiny_config

CONFIG = tiny_config(num_classes=4)


@pytest.fixture()
def scene(tmp_path) -> Path:
    return write_tif(tmp_path / "scene.tif", random_scene(48, 48))


def segment_with(capfd, tmp_path, scene, ckpt, *extra):
    before = snapshot(tmp_path)
    code, out, err = cli(capfd, "segment", scene, "-c", ckpt, "-o", tmp_path / "out.tif",
                         "--tile", "64", *extra)
    return code, out, err, before


class SystemPayload:
    """Unpickling this runs ``os.system`` (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _malicious(tmp: Path, kind: str, marker: Path) -> Path:
    path = tmp / f"{kind}.pth"
    sd = random_state_dict(CONFIG)
    if kind == "zip-os-system":
        torch.save({"state_dict": sd, "meta": {"hook": SystemPayload(marker)}}, path)
    elif kind == "zip-exec-in-state-dict":
        sd["backbone.norm.weight"] = ExecPayload(marker)
        torch.save({"state_dict": sd}, path)
    elif kind == "legacy-os-system":
        torch.save({"state_dict": sd, "x": SystemPayload(marker)}, path,
                   _use_new_zipfile_serialization=False)
    elif kind == "raw-pickle-protocol-2":
        path.write_bytes(pickle.dumps({"state_dict": SystemPayload(marker)}, protocol=2))
    elif kind == "raw-pickle-protocol-0":
        path.write_bytes(pickle.dumps(SystemPayload(marker), protocol=0))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["zip-os-system", "zip-exec-in-state-dict", "legacy-os-system",
                                  "raw-pickle-protocol-2", "raw-pickle-protocol-0"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, capfd, scene, kind):
    marker = tmp_path / "pwned"
    evil = _malicious(tmp_path, kind, marker)
    code, _, err, before = segment_with(capfd, tmp_path, scene, evil)
    line = assert_user_error(code, err, evil.name)
    assert "refusing to load" in line or "not a checkpoint" in line, line
    assert not marker.exists(), "the payload ran"
    assert_nothing_written(tmp_path, before)


def test_the_payloads_are_real(tmp_path):
    """The files above do run code when unpickled naively: the refusal is what protects."""
    marker = tmp_path / "ran"
    path = _malicious(tmp_path, "raw-pickle-protocol-2", marker)
    pickle.loads(path.read_bytes())  # noqa: S301 - on purpose, in a temporary folder
    assert marker.exists()


def _damaged(tmp: Path, kind: str) -> Path:
    if kind == "zip-truncated":
        good = tiny_checkpoint(tmp / "good.pth")
        data = good.read_bytes()
        (tmp / "cut.pth").write_bytes(data[: len(data) // 2])
        good.unlink()
        return tmp / "cut.pth"
    if kind == "zip-only-the-start":
        good = tiny_checkpoint(tmp / "good.pth")
        (tmp / "cut.pth").write_bytes(good.read_bytes()[:600])
        good.unlink()
        return tmp / "cut.pth"
    if kind == "legacy-truncated":
        torch.save(random_state_dict(CONFIG), tmp / "legacy.pth",
                   _use_new_zipfile_serialization=False)
        data = (tmp / "legacy.pth").read_bytes()
        (tmp / "cut.pth").write_bytes(data[: len(data) * 2 // 3])
        (tmp / "legacy.pth").unlink()
        return tmp / "cut.pth"
    if kind == "safetensors-truncated":
        from crossearth_cli.model.random_init import write_random_checkpoint

        good = write_random_checkpoint(tmp / "good.safetensors", CONFIG, fmt="safetensors")
        data = good.read_bytes()
        (tmp / "cut.safetensors").write_bytes(data[: len(data) - 1000])
        good.unlink()
        return tmp / "cut.safetensors"
    if kind == "empty":
        (tmp / "cut.pth").write_bytes(b"")
        return tmp / "cut.pth"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["zip-truncated", "zip-only-the-start", "legacy-truncated",
                                  "safetensors-truncated", "empty"])
def test_truncated_checkpoints(tmp_path, capfd, scene, kind):
    """(convert-checkpoint: test_checkpoint_cli.py::test_bad_checkpoint_gives_one_clear_line)"""
    path = _damaged(tmp_path, kind)
    code, _, err, before = segment_with(capfd, tmp_path, scene, path)
    line = assert_user_error(code, err, path.name)
    assert "truncated" in line or "empty" in line or "download" in line, line
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8],
                         ids=["int64", "bool", "complex64", "uint8"])
def test_wrong_dtypes_are_refused(tmp_path, capfd, scene, dtype):
    sd = random_state_dict(CONFIG)
    sd["decode_head.cls_embed.weight"] = sd["decode_head.cls_embed.weight"].to(dtype)
    torch.save({"state_dict": sd}, tmp_path / "odd.pth")
    code, _, err, before = segment_with(capfd, tmp_path, scene, tmp_path / "odd.pth")
    name = str(dtype).replace("torch.", "")
    assert_user_error(code, err, "odd.pth", "decode_head.cls_embed.weight", f"dtype {name}")
    assert_nothing_written(tmp_path, before)


def test_float64_and_bfloat16_weights_are_converted_with_a_note(tmp_path, capfd, scene):
    sd = random_state_dict(CONFIG)
    sd = {k: (v.double() if i % 2 else v.bfloat16()) for i, (k, v) in enumerate(sd.items())}
    torch.save({"state_dict": sd}, tmp_path / "mixed.pth")
    code, _, err, _ = segment_with(capfd, tmp_path, scene, tmp_path / "mixed.pth")
    assert code == 0, err
    assert "bfloat16, float64 were converted to float32" in err


def test_nan_weights_warn(tmp_path, capfd, scene):
    """(Library level: test_checkpoint.py::test_half_precision_is_cast_and_nan_is_a_warning.)
    The run still completes; the warning says the output is unusable."""
    sd = random_state_dict(CONFIG)
    sd["decode_head.cls_embed.bias"][0] = float("nan")
    torch.save({"state_dict": sd}, tmp_path / "nan.pth")
    code, _, err, _ = segment_with(capfd, tmp_path, scene, tmp_path / "nan.pth")
    assert code == 0, err
    assert "NaN or Inf" in err and "decode_head.cls_embed.bias" in err and "unusable" in err


def test_preset_with_a_checkpoint_of_another_class_count(tmp_path, scene):
    """``--model potsdam-rgb`` (6 classes) finds a 4-class file in the Hugging Face cache
    (a renamed or mixed-up download): a clear error naming both, even though the file names
    its own 4 classes."""
    from crossearth_cli.presets import HF_REPO, get_preset

    preset = get_preset("potsdam-rgb")
    repo = tmp_path / "hf" / "hub" / f"models--{HF_REPO.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    tiny_checkpoint(snap / preset.repo_path, num_classes=4,
                    classes=["water", "field", "forest", "city"])
    proc = run_cli("segment", scene, "--model", "potsdam-rgb", "-o", tmp_path / "o.tif",
                   env=real_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, proc.stderr
    for needle in ("Potsdam(r)-source.pth", "4 classes", "potsdam-rgb", "has 6"):
        assert needle in line, line
    assert not (tmp_path / "o.tif").exists()


def test_a_damaged_full_checkpoint_and_a_folder_are_named_for_what_they_are(
    tmp_path, capfd, scene, monkeypatch
):
    """A full checkpoint missing one backbone tensor is reported as missing it, not as a
    Rein-and-head-only file needing --backbone; a folder named like a word of the message
    ("ck" in "checkpoint") is still named."""
    sd = random_state_dict(CONFIG)
    del sd["backbone.blocks.0.attn.qkv.weight"]
    damaged = tmp_path / "damaged.pth"
    torch.save({"state_dict": sd}, damaged)
    code, _, err, before = segment_with(capfd, tmp_path, scene, damaged)
    assert_user_error(code, err, "missing backbone.blocks.0.attn.qkv.weight")
    assert "--backbone" not in err
    assert_nothing_written(tmp_path, before)
    (tmp_path / "ck").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err, before = segment_with(capfd, tmp_path, scene, "ck")
    assert_user_error(code, err, "error: ck: is a folder")


def test_convert_destinations_are_named_for_what_they_are(tmp_path, capfd):
    src = tiny_checkpoint(tmp_path / "model.pth")
    (tmp_path / "out.safetensors").mkdir()
    (tmp_path / "afile").write_text("x")
    for dst, needle in ((tmp_path / "out.safetensors", "is a folder"),
                        (tmp_path / "afile" / "m.safetensors", "afile is a file, not a folder")):
        before = snapshot(tmp_path)
        code, _, err = cli(capfd, "convert-checkpoint", src, dst)
        assert_user_error(code, err, needle)
        assert_nothing_written(tmp_path, before)
