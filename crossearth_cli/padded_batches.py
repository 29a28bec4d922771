"""One compilation per tile shape under ``--compile``.

``torch.compile(dynamic=False)`` compiles again for every new batch size: ~80 s for ViT-L on
an H200 (docs/performance.md), and after eight sizes it stops compiling and runs eagerly. A
scene's last batch is usually smaller, and a folder's groups can be any size, so
:class:`PaddedBatches` pads a batch smaller than the largest that has run for its tile shape
with zero tiles up to it, and cuts the result back. Tiles do not see each other in the model,
so the padding changes nothing for the real ones; it costs at most one batch's compute per
scene against a compilation.
"""

from __future__ import annotations

import torch

from crossearth_cli.errors import is_out_of_memory

__all__ = ["PaddedBatches"]


class PaddedBatches(torch.nn.Module):
    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.largest: dict[tuple, int] = {}  # (tile shape, dtype) -> the largest batch run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key, n = (tuple(x.shape[1:]), x.dtype), x.shape[0]
        full = self.largest.get(key, 0)
        if n >= full:
            out = self.module(x)
            self.largest[key] = n  # only once it ran: a batch that ran out of memory is not
            return out
        padded = torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))])
        try:
            return self.module(padded)[:n]
        except Exception as exc:
            if is_out_of_memory(exc):  # the halved batch must then run as it is
                self.largest.pop(key, None)
            raise
