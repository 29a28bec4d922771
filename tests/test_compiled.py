"""``--compile`` (crossearth_cli/compiled.py): one compilation per tile shape (smaller batches
padded), and the eager model where compiling fails. A stand-in for the compiled module
records the batch sizes it would see."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from crossearth_cli.compiled import CompiledForward


class Recorded(torch.nn.Module):
    """``module``, with the batch sizes it is called with; out of memory where ``oom(x)``,
    ``error`` raised where given (a compilation failing)."""

    def __init__(self, module, oom=lambda x: False, error: Exception | None = None):
        super().__init__()
        self.module, self.oom, self.error, self.sizes = module, oom, error, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if self.oom(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
        if self.error is not None:
            raise self.error
        return self.module(x)


@pytest.fixture(scope="module")
def net():
    return tiny_model()


@torch.inference_mode()
def test_smaller_batches_are_padded_to_the_largest_and_cut_back(net):
    padded = CompiledForward(recorded := Recorded(net), net)
    gen = torch.Generator().manual_seed(0)
    for n, size in ((4, 32), (3, 32), (1, 32), (2, 48), (4, 32), (3, 48)):
        x = torch.randn(n, 3, size, size, generator=gen)
        got = padded(x)
        assert got.shape[0] == n
        torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-5)  # tiles are independent
    # one batch size per tile shape: 32² at 4 throughout, 48² at 2 until a 3 came
    assert recorded.sizes == [4, 4, 4, 2, 4, 3]


def test_out_of_memory_reaches_the_batch_halving_and_no_tile_is_lost():
    """Through the Predictor, as segment runs it: a batch of 4 runs out of memory, so 4 is
    not what later batches are padded to; the halved batches run at 2 and the odd last tile
    is padded to 2."""
    from helpers import per_pixel_spec

    from crossearth_cli.engine import Predictor

    spec = per_pixel_spec(num_classes=4)
    recorded = Recorded(spec.module, oom=lambda x: x.shape[0] > 2)
    compiled = CompiledForward(recorded, spec.module)
    predictor = Predictor(spec, torch.device("cpu"), "fp32", 4, compiled)
    plain = Predictor(spec, torch.device("cpu"), "fp32", 4)
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    valid = torch.ones(7, 16, 16, dtype=torch.bool)
    assert torch.equal(predictor(images, valid), plain(images, valid))
    assert predictor.batch_size == 2 and predictor.halvings == 1
    assert recorded.sizes == [4, 2, 2, 2, 2]  # the 7th tile padded into a batch of 2
    assert compiled.failed is None  # out of memory is not a failure to compile


@torch.inference_mode()
def test_a_padded_batch_out_of_memory_is_not_padded_again(net):
    recorded = Recorded(net)
    padded = CompiledForward(recorded, net)
    x = torch.randn(4, 3, 32, 32)
    padded(x)
    recorded.oom = lambda x: x.shape[0] == 4  # memory got scarcer since
    with pytest.raises(torch.cuda.OutOfMemoryError):
        padded(x[:3])
    recorded.oom = lambda x: False
    padded(x[:2])
    padded(x[:1])
    assert recorded.sizes == [4, 4, 2, 2]


def test_compiled_sessions_pad_their_batches(net):
    from crossearth_cli.engine import runtime_module

    module, eager = runtime_module(net, torch.device("cuda"), "bf16", compile=True)
    assert isinstance(module, CompiledForward) and module.eager is eager
    assert module.compiled is not eager and eager is not net
    module, eager = runtime_module(net, torch.device("cuda"), "bf16")
    assert not isinstance(module, CompiledForward)


@torch.inference_mode()
def test_a_failed_compilation_warns_once_and_runs_eagerly_without_losing_the_batch(net):
    recorded = Recorded(net, error=RuntimeError("InductorError: no working C compiler\nmore"))
    compiled = CompiledForward(recorded, net)
    x = torch.randn(3, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="torch.compile unavailable.*no working C compiler"):
        torch.testing.assert_close(compiled(x), net(x))
    recorded.error = None  # even if it could now: given up for the process
    for n in (3, 2):
        torch.testing.assert_close(compiled(x[:n]), net(x[:n]))
    assert recorded.sizes == [3] and compiled.failed.startswith("RuntimeError")


def test_xformers_only_for_unmasked_cuda_attention_outside_compilation(monkeypatch):
    """With xformers installed (the optional CUDA extra) the ViT's unmasked CUDA attention
    uses it, as the original code did; masked or CPU attention, and anything dynamo traces
    (`--compile`), use SDPA."""
    from types import SimpleNamespace

    from crossearth_cli.model import attention

    cuda_q, cpu_q = SimpleNamespace(is_cuda=True), torch.zeros(1)
    monkeypatch.setattr(attention, "_xformers_ops", lambda: SimpleNamespace())
    assert attention.use_xformers(cuda_q, None)
    assert not attention.use_xformers(cuda_q, torch.ones(1, dtype=torch.bool))
    assert not attention.use_xformers(cpu_q, None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attention.use_xformers(cuda_q, None)
    monkeypatch.undo()
    monkeypatch.setattr(attention, "_xformers_ops", lambda: None)  # not installed
    assert not attention.use_xformers(cuda_q, None)


def test_cudnn_attention_first_only_when_asked_and_on_cuda(monkeypatch):
    """CROSSEARTH_SDPA=cudnn (a GPU candidate, opt-in until measured) puts cuDNN first in
    SDPA's order for CUDA tensors, and only then; elsewhere SDPA keeps its own choice."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend

    from crossearth_cli.model import attention

    cuda_q, cpu_q = SimpleNamespace(is_cuda=True), torch.zeros(1)
    monkeypatch.delenv(attention.SDPA_ENV, raising=False)
    assert not attention._prefer_cudnn(cuda_q)
    monkeypatch.setenv(attention.SDPA_ENV, "cudnn")
    assert attention._prefer_cudnn(cuda_q) and not attention._prefer_cudnn(cpu_q)
    before = torch._C._get_sdp_priority_order()
    with attention._cudnn_first():
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == before
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # dynamo: SDPA as is
    assert not attention._prefer_cudnn(cuda_q)


def test_out_of_memory_at_a_size_that_ran_before_halves_once():
    """A batch of 4 ran compiled; later 4 no longer fits (a wider band, another process):
    the halved batches run at 2, not padded back up to the 4 that failed (which halved the
    batch twice and compiled a third size)."""
    from helpers import per_pixel_spec

    from crossearth_cli.engine import Predictor

    spec = per_pixel_spec(num_classes=4)
    recorded = Recorded(spec.module)
    predictor = Predictor(spec, torch.device("cpu"), "fp32", 4,
                          CompiledForward(recorded, spec.module))
    plain = Predictor(spec, torch.device("cpu"), "fp32", 4)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    valid = torch.ones(8, 16, 16, dtype=torch.bool)
    predictor(images[:4], valid[:4])
    recorded.oom = lambda x: x.shape[0] > 2
    torch.testing.assert_close(predictor(images, valid), plain(images, valid))
    assert recorded.sizes == [4, 4, 2, 2, 2, 2]
    assert predictor.batch_size == 2 and predictor.halvings == 1
