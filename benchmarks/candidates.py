"""Changes that are not in crossearth, for `gpu_explore.py` to time on a GPU.

- :func:`head_compile`: ``torch.compile`` of the Mask2Former head only (pixel decoder and
  transformer decoder, one graph with the deformable-attention kernel as one op in it), the
  backbone keeping its fused Triton kernels. The head took ~28 of a 58 ms batch on the H200
  for ~15 % of the FLOPs: many small element-wise passes that inductor fuses, the very
  passes `--compile` fuses, without giving up the hand-fused ViT, and with a shorter compile.

- :func:`regional_compile`: ``torch.compile`` of the 24 blocks and the Rein update only (one
  graph, reused by every layer), to compare its compile time and speed with ``--compile``.
  On an H200 (2026-11-27) it compiled in 13.8 s and ran at 0.98× eager (226.2 against 231.5
  tiles/s), so it stays here.

Earlier candidates, measured on that H200 as patches and then settled (docs/performance.md):
the Rein update in place (+3.6 %) and LayerScale as one ``addcmul`` (+0.7 %) were overtaken by
``crossearth_cli/model/vit_triton.py``'s fused kernels (+25 %), which crossearth now uses; the
patch embedding as one GEMM (+2 %) is ``PatchEmbed.forward``'s CUDA path now.
"""

from __future__ import annotations

import copy

import torch
from scenes import ROOT  # noqa: F401 - puts this checkout on sys.path


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A copy sharing parameters and buffers, with its own table of sub-modules."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def regional_compile(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` (a CrossEarth, weights shared) with its ViT blocks and Rein update
    compiled; ``net`` itself stays eager."""
    net = _shallow(net)
    net.backbone = backbone = _shallow(net.backbone)
    backbone.blocks = torch.nn.ModuleList(_shallow(b) for b in backbone.blocks)
    for blk in backbone.blocks:
        blk.compile(dynamic=False)
    backbone.reins = _shallow(backbone.reins)
    backbone.reins.update = torch.compile(backbone.reins.update, dynamic=False)
    return net


def head_compile(net: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """A copy of ``net`` (a CrossEarth, weights shared) whose ``decode_head`` is compiled;
    ``net`` itself stays eager."""
    net = _shallow(net)
    net.decode_head = torch.compile(net.decode_head, dynamic=False, backend=backend)
    return net
