import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests never touch the network or the real Hugging Face cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs two pytest-xdist workers on what may be a 2-core machine: idle OpenMP
# threads then sleep instead of spinning on cores the other worker needs (set before torch
# loads; the CLI runs the tests start inherit it). Same threads, same numbers: waits only.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A tiny 4-class random-weight CrossEarth checkpoint (mmengine format), shared."""
    from reliability_helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", num_classes=4)
