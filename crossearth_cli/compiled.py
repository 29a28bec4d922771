"""``--compile``: the compiled model, once per tile shape, and eager where it cannot compile.

``torch.compile(dynamic=False)`` compiles again for every new batch size: ~80 s for ViT-L on
an H200 (docs/performance.md), and after eight sizes it stops compiling and runs eagerly. A
scene's last batch is usually smaller, and a folder's last group too, so
:class:`CompiledForward` pads a batch smaller than the largest that has run for its tile
shape with zero tiles up to it, and cuts the result back. Tiles do not see each other in the
model, so the padding changes nothing for the real ones; it costs at most one batch's compute
per scene against a compilation.

A compilation that fails (no C compiler for inductor, a Triton or backend error) must not
stop a run: one warning, and the eager model from then on, as for the fused kernels. Out of
memory is not such a failure: it reaches the Predictor, which halves the batch, and the
halved batch is then not padded back up.
"""

from __future__ import annotations

import warnings

import torch

from crossearth_cli.errors import is_out_of_memory

__all__ = ["CompiledForward"]


class CompiledForward(torch.nn.Module):
    def __init__(self, compiled: torch.nn.Module, eager: torch.nn.Module):
        super().__init__()
        self.compiled, self.eager = compiled, eager
        self.largest: dict[tuple, int] = {}  # (tile shape, dtype) -> the largest batch run
        self.failed: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return self._compiled(x)
            except Exception as exc:  # noqa: BLE001 - any failure but OOM: eager from now on
                if is_out_of_memory(exc):
                    raise
                self.failed = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"torch.compile unavailable ({self.failed.splitlines()[0][:200]});"
                              " running the model eagerly", RuntimeWarning, stacklevel=2)
        return self.eager(x)

    def _compiled(self, x: torch.Tensor) -> torch.Tensor:
        key, n = (tuple(x.shape[1:]), x.dtype), x.shape[0]
        full = self.largest.get(key, 0)
        try:
            if n >= full:
                out = self.compiled(x)
                self.largest[key] = n  # only once it ran: a batch out of memory is not the size
                return out
            return self.compiled(torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))]))[:n]
        except Exception as exc:
            # out of memory, even at a size that ran before: the halved batch that follows
            # must run as it is, not padded back up to the size that failed
            if is_out_of_memory(exc):
                self.largest.pop(key, None)
            raise
