"""`crossearth models` and `crossearth --help` work, and the CLI starts without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crossearth_cli.cli import main
from crossearth_cli.presets import PRESETS


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_models_lists_every_preset(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    code, out, _ = cli(capsys, "models")
    assert code == 0
    for p in PRESETS:
        assert p.name in out and p.file in out
    assert "IRRG" in out and "512/341" in out and "1024/683" in out and "0.05" in out


def test_models_json(capsys):
    code, out, _ = cli(capsys, "models", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [p.name for p in PRESETS]
    assert rows[0]["hf_repo"] == "Cusyoung/CrossEarth"


def test_help_lists_the_model_commands(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for cmd in ("models", "convert-checkpoint", "convert-dinov2"):
        assert cmd in out
    code, out, _ = cli(capsys, "convert-checkpoint", "--help")
    assert code == 0 and "--backbone" in out and "--overwrite" in out


def test_cli_import_stays_light():
    """`crossearth --help` must be instant: importing the CLI may not pull in torch or timm."""
    code = (
        "import sys, crossearth_cli.cli, crossearth_cli.presets; "
        "print(','.join(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""
