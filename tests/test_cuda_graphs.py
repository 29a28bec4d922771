"""CUDA-graph replay (crossearth_cli/cuda_graphs.py): its bookkeeping, on the CPU.

The two CUDA calls (the eager warm-up on the capture stream, the capture) are replaced by a
stand-in whose "graph", when replayed, runs the module from the static input into the static
output, which is what a captured graph does. What is checked is everything around them: one
graph per tile shape, smaller batches padded into it, results copied out, the least recently
used graph dropped, a failed capture falling back to eager without losing the batch, and
out-of-memory reaching the batch halving.
"""

from __future__ import annotations

import pytest
import torch

from crossearth_cli.cuda_graphs import ENV, GraphedForward, _Graph


class CpuGraphs(GraphedForward):
    def __init__(self, module, capture_error: BaseException | None = None,
                 warm_up_error=None, **kw):
        super().__init__(module, **kw)
        self.capture_error, self.warm_up_error = capture_error, warm_up_error
        self.eager_calls = self.replays = 0

    def _warm_up(self, x):
        if self.warm_up_error is not None and self.warm_up_error(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
        self.eager_calls += 1
        return self.module(x)

    def _capture(self, x):
        if self.capture_error is not None:
            raise self.capture_error
        static_in = x.clone()
        static_out = self.module(static_in)
        owner = self

        class Replay:
            def replay(self):
                owner.replays += 1
                static_out.copy_(owner.module(static_in))

        return _Graph(Replay(), static_in, static_out)


class Scores(torch.nn.Module):
    """Per-pixel scores, 4 classes (a 1×1 convolution)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def batch(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_the_first_batch_of_a_shape_runs_eagerly_then_replays():
    net = Scores()
    graphed = CpuGraphs(net)
    for seed in range(3):
        x = batch(4, seed=seed)
        assert torch.equal(graphed(x), net(x))
    assert (graphed.eager_calls, graphed.captures, graphed.replays) == (1, 1, 2)


@torch.inference_mode()
def test_a_smaller_batch_is_padded_into_the_graph_and_a_larger_one_captures_again():
    net = Scores()
    graphed = CpuGraphs(net)
    graphed(batch(4))
    x = batch(3, seed=1)  # the last batch of a scene
    assert torch.equal(graphed(x), net(x))
    assert graphed.captures == 1 and graphed.replays == 1
    x = batch(6, seed=2)
    assert torch.equal(graphed(x), net(x))
    assert graphed.captures == 2 and len(graphed.graphs) == 1  # the batch-4 graph replaced
    x = batch(5, seed=3)
    assert torch.equal(graphed(x), net(x)) and graphed.replays == 2


@torch.inference_mode()
def test_results_are_copies_that_later_replays_do_not_overwrite():
    net = Scores()
    graphed = CpuGraphs(net)
    graphed(batch(2))
    first = graphed(batch(2, seed=1))
    kept = first.clone()
    graphed(batch(2, seed=2))
    assert torch.equal(first, kept)


@torch.inference_mode()
def test_one_graph_per_tile_shape_and_the_least_recently_used_is_dropped():
    net = Scores()
    graphed = CpuGraphs(net, max_graphs=2)
    for size in (8, 12, 8, 16):  # 8 used again before 16 arrives: 12 is the one dropped
        x = batch(2, size=size, seed=size)
        assert torch.equal(graphed(x), net(x))
    assert [key[0][1:] for key in graphed.graphs] == [(8, 8), (16, 16)]
    assert graphed.captures == 3


@torch.inference_mode()
def test_a_failed_capture_warns_once_and_runs_eagerly_without_losing_the_batch():
    net = Scores()
    graphed = CpuGraphs(net, capture_error=RuntimeError(
        "operation not permitted when stream is capturing"))
    x = batch(4)
    with pytest.warns(RuntimeWarning, match="CUDA graphs unavailable.*not permitted"):
        assert torch.equal(graphed(x), net(x))
    graphed.capture_error = None  # even if it could now: given up for the process
    for seed in (1, 2):
        x = batch(4, seed=seed)
        assert torch.equal(graphed(x), net(x))
    assert graphed.captures == 0 and not graphed.graphs and graphed.eager_calls == 1


def test_out_of_memory_in_the_warm_up_reaches_the_batch_halving_and_no_tile_is_lost():
    """Through the Predictor, as segment runs it: batches of 4 run out of memory, the batch
    is halved, the graph is captured at 2 and the odd last tile is padded into it."""
    from helpers import per_pixel_spec

    from crossearth_cli.engine import Predictor

    spec = per_pixel_spec(num_classes=4)
    graphed = CpuGraphs(spec.module, warm_up_error=lambda x: x.shape[0] > 2)
    predictor = Predictor(spec, torch.device("cpu"), "fp32", 4, graphed)
    plain = Predictor(spec, torch.device("cpu"), "fp32", 4)
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    valid = torch.ones(7, 16, 16, dtype=torch.bool)
    valid[6, :4] = False  # a batch with nodata takes the masking path too
    want = plain(images, valid)
    got = predictor(images, valid)
    assert torch.equal(got, want)
    assert predictor.batch_size == 2 and predictor.halvings == 1
    assert graphed.captures == 1 and graphed.replays == 3 and not graphed.failed


def test_sessions_use_graphs_on_cuda_only_when_asked_and_never_with_compile(monkeypatch):
    from crossearth_cli.engine import runtime_module
    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model.random_init import tiny_config

    net = CrossEarth(tiny_config(num_classes=4)).eval()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(ENV, raising=False)
    module, eager = runtime_module(net, cuda, "bf16")
    assert module is eager and not isinstance(module, GraphedForward)
    monkeypatch.setenv(ENV, "1")
    module, eager = runtime_module(net, cuda, "bf16")
    assert isinstance(module, GraphedForward) and module.module is eager and eager is not net
    module, eager = runtime_module(net, cuda, "bf16", compile=True)
    assert not isinstance(module, GraphedForward) and module is not eager
    assert runtime_module(net, cpu, "fp32") == (net, net)
