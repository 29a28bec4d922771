"""The model's forward replayed as a CUDA graph: one launch per batch instead of ~1,500.

Eager PyTorch spends host time on each of the model's kernel launches: a ViT-L CrossEarth
forward of one 512² tile ran at 24.6 tiles/s on an H200 (docs/performance.md), about 40 ms of
host time for a few ms of GPU work. That is time the host cannot spend reading, blending and
writing, and a folder of single-tile files pays it per file. A captured graph replays every
kernel of a forward with one call.

Rules (:class:`GraphedForward`):

- One graph per tile shape and dtype, captured at the first batch of that shape; smaller
  batches of the shape (the last of a scene) are padded into it, so no second graph and no
  eager memory beside the graph's; a larger batch captures it again. At most
  :data:`MAX_GRAPHS` live, the least recently used dropped. They share one memory pool, and
  each output is copied out right after its replay, so no replay can overwrite a result.
- The first batch of a shape runs eagerly on the capture stream (the warm-up that compiles
  Triton kernels and fills the model's caches), and that output is what the call returns.
- If a capture fails (an operation that cannot be captured, out of memory), graphs are given
  up for the process with one warning; the eager output is already there, so nothing is lost.

Off unless ``CROSSEARTH_CUDA_GRAPHS=1``, until a GPU run has measured it
(``benchmarks/gpu_explore.py``, steps ``*cuda_graphs*``).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["GraphedForward", "cuda_graphs_wanted", "ENV", "MAX_GRAPHS"]

ENV = "CROSSEARTH_CUDA_GRAPHS"
MAX_GRAPHS = 4


def cuda_graphs_wanted() -> bool:
    return os.environ.get(ENV) == "1"


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph (or a test's stand-in with .replay())
    static_in: torch.Tensor  # B×3×h×w, the input the graph reads
    static_out: torch.Tensor  # B×C×h×w, the output the graph writes


class GraphedForward(torch.nn.Module):
    """``module``'s forward, replayed from CUDA graphs (see the module's docstring)."""

    def __init__(self, module: torch.nn.Module, max_graphs: int = MAX_GRAPHS):
        super().__init__()
        self.module = module
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.failed: str | None = None
        self.captures = 0
        self._pool = None
        self._stream = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.module(x)
        key = (tuple(x.shape[1:]), x.dtype)
        entry = self.graphs.get(key)
        if entry is not None and entry.static_in.shape[0] >= x.shape[0]:
            self.graphs.move_to_end(key)
            return self._replay(entry, x)
        out = self._warm_up(x)
        self.graphs.pop(key, None)  # a smaller graph of this shape: replaced
        try:
            entry = self._capture(x)
        except Exception as exc:  # noqa: BLE001 - any failure: eager from now on
            self.give_up(exc)
            return out
        self.graphs[key] = entry
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return out

    def give_up(self, exc: BaseException) -> None:
        """Eager from now on, with one warning; the graphs and their memory are released."""
        self.failed = f"{type(exc).__name__}: {exc}"
        self.graphs.clear()
        self._pool = None
        warnings.warn(f"CUDA graphs unavailable ({self.failed[:200]}); running the model "
                      "eagerly", RuntimeWarning, stacklevel=3)

    def _replay(self, entry: _Graph, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        entry.static_in[:n].copy_(x)  # rows n.. keep earlier tiles: computed, then ignored
        entry.graph.replay()
        return entry.static_out[:n].clone()

    # -- CUDA --------------------------------------------------------------------------------
    # Tests replace these two with CPU stand-ins; everything above is device-independent.

    def _warm_up(self, x: torch.Tensor) -> torch.Tensor:
        """The eager forward, on the stream captures use (cuBLAS workspaces and the like are
        per stream), returned as a tensor of the caller's stream."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(x.device)
        caller = torch.cuda.current_stream(x.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream), _no_autocast_cache():
            out = self.module(x)
        caller.wait_stream(self._stream)
        out.record_stream(caller)
        return out

    def _capture(self, x: torch.Tensor) -> _Graph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_in = x.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the reader and writer threads may use CUDA (pinned memory, events)
        # while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                              capture_error_mode="thread_local"), _no_autocast_cache():
            static_out = self.module(static_in)
        return _Graph(graph, static_in, static_out)


def _no_autocast_cache():
    """Autocast as it is, minus its cache of weight casts: a cast cached by an eager call
    and read by a captured graph would be freed when the autocast region ends, under the
    graph's feet (PyTorch's CUDA-graph notes). The weights are stored cast already
    (``autocast_weights``), so nothing is lost."""
    device = "cuda"
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                          enabled=torch.is_autocast_enabled(device), cache_enabled=False)
