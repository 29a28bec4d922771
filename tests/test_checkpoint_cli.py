"""Bad checkpoints through the CLI: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from crossearth_cli.cli import main
from crossearth_cli.model.random_init import (
    random_state_dict,
    split_backbone_path,
    tiny_config,
    write_random_checkpoint,
)

CONFIG = tiny_config(num_classes=6, img_size=64)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("crossearth: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def bad_files(tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    good = write_random_checkpoint(tmp / "good.pth", CONFIG)
    data = good.read_bytes()
    (tmp / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp / "notes.pth").write_text("these are my notes, not weights\n" * 20)
    torch.save({"state_dict": {}, "x": Payload(tmp / "pwned")}, tmp / "evil.pth")
    sd = random_state_dict(CONFIG)
    sd["decode_head.query_embed.weight"] = sd.pop("decode_head.querys2feat.weight")
    torch.save({"state_dict": sd}, tmp / "other_arch.pth")
    split = write_random_checkpoint(tmp / "split.pth", CONFIG, fmt="split")
    return {
        "missing": (tmp / "nope.pth", ("nope.pth", "no such file")),
        "truncated": (tmp / "truncated.pth", ("truncated.pth", "truncated or corrupted")),
        "not a checkpoint": (tmp / "notes.pth", ("notes.pth", "not a checkpoint")),
        "code": (tmp / "evil.pth", ("evil.pth", "refusing to load", "Python code")),
        "architecture": (
            tmp / "other_arch.pth",
            ("other_arch.pth", "missing decode_head.querys2feat.weight", "query_embed"),
        ),
        "split": (split, ("split.pth", "--backbone dinov2_converted.pth")),
    }


@pytest.mark.parametrize(
    "case", ["missing", "truncated", "not a checkpoint", "code", "architecture", "split"]
)
def test_bad_checkpoint_gives_one_clear_line(tmp_path, capsys, case):
    path, needles = bad_files(tmp_path)[case]
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "convert-checkpoint", str(path), str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()
    assert not (tmp_path / "pwned").exists()  # the pickled payload never ran
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_checkpoint_cli(tmp_path, capsys):
    src = write_random_checkpoint(tmp_path / "split.pth", CONFIG, fmt="split")
    out = tmp_path / "model.safetensors"
    code, stdout, err = cli(
        capsys,
        "convert-checkpoint",
        str(src),
        str(out),
        "--backbone",
        str(split_backbone_path(src)),
    )
    assert code == 0, err
    assert "wrote" in stdout and "6 classes" in stdout and "impervious_surface" in stdout
    assert out.exists()
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # as any new file (was mkstemp's 0600)
    code, _, err = cli(capsys, "convert-checkpoint", str(out), str(out))
    assert_one_line_error(code, err, "already exists", "--overwrite")
    new = tmp_path / "new" / "m.safetensors"
    code, _, err = cli(capsys, "convert-checkpoint", str(out), str(new))
    assert code == 0 and new.exists(), err  # its folder made, as segment makes its own
    code, _, err = cli(capsys, "convert-checkpoint", str(src), str(tmp_path / "x.pth"))
    assert_one_line_error(code, err, ".safetensors")


def test_convert_checkpoint_prints_warnings(tmp_path, capsys):
    sd = random_state_dict(CONFIG)
    sd["task_head.fc.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": sd}, tmp_path / "extras.pth")
    code, _, err = cli(
        capsys, "convert-checkpoint", str(tmp_path / "extras.pth"), str(tmp_path / "o.safetensors")
    )
    assert code == 0
    assert "crossearth: warning: dropped 1 training-only tensors" in err


def test_convert_dinov2_cli_rejects_a_bad_size(tmp_path, capsys):
    code, _, err = cli(
        capsys, "convert-dinov2", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--size", "700"
    )
    assert_one_line_error(code, err, "--size must be 512 or 1024")
    code, _, err = cli(capsys, "convert-dinov2", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"))
    assert_one_line_error(code, err, "a.pth", "no such file")


def test_a_full_disk_while_converting_is_one_line(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk in its own exception (the OS error inside its text):
    one line naming the output, no traceback, no temporary left."""
    import safetensors.torch

    src = write_random_checkpoint(tmp_path / "m.pth", CONFIG)

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli(capsys, "convert-checkpoint", str(src), str(out / "m.safetensors"))
    assert_one_line_error(code, err, "m.safetensors", "no space left")
    assert list(out.iterdir()) == []
