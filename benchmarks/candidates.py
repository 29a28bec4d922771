"""Changes that are not in crossearth yet, for `gpu_explore.py` to time on a GPU first.

On an H100 the ViT-L backbone takes 48 of a 16-tile batch's 75 ms, ~27 of them in
memory-bound element-wise passes (docs/performance.md, GPU). These candidates remove some of
those passes; each is adopted only once a GPU run shows it faster.

- :func:`rein_in_place`: the Rein update writes ``delta + f`` straight into the autocast dtype
  (the cast autocast would make next) and adds its result into the block's output in place
  instead of building a new tensor with ``torch.cat``: two passes fewer per layer, the same
  numbers (tested).
- :func:`layer_scale_addcmul`: the ViT blocks add ``x + γ·y`` in one pass (``addcmul``) instead
  of a multiply and an add: two passes fewer per block; float32 results may differ in the last
  bit (a fused multiply-add rounds once).
- :func:`patch_embed_gemm`: the 16×16/16 patch convolution as one GEMM over the image cut into
  patches. On the H100 cuDNN ran it as an implicit-GEMM kernel at ~19 TFLOP/s (1.35 ms of a
  16-tile batch for 26 GFLOP); as a GEMM it is a copy of the image plus ~0.1 ms. float32
  results differ in the last bits (another summation order).
- :func:`regional_compile`: ``torch.compile`` of the 24 blocks and the Rein update only (one
  graph, reused by every layer), to compare its compile time and speed with ``--compile``.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from scenes import ROOT  # noqa: F401 - puts this checkout on sys.path
from timm.models.vision_transformer import Block

from crossearth_cli.model.attention import attention
from crossearth_cli.model.backbone import PatchEmbed
from crossearth_cli.model.reins import LoRAReins


def _rein_update_in_place(self: LoRAReins, x: torch.Tensor, tokens: torch.Tensor,
                          values: torch.Tensor) -> torch.Tensor:
    f = x[:, 1:]  # B×N×C, a view: the update lands in x
    dev = f.device.type
    ct = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else f.dtype
    b = f.shape[0]
    delta = attention(
        f.to(ct)[:, None],
        tokens.to(ct)[None, None].expand(b, 1, -1, -1),
        values.to(ct)[None, None].expand(b, 1, -1, -1),
        scale=self.embed_dims**-0.5,
    )[:, 0]
    summed = torch.add(delta, f, out=torch.empty(f.shape, dtype=ct, device=f.device))
    f.add_(self.scale * self.mlp_delta_f(summed))
    return x


def _block_addcmul(self: Block, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
    y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
    x = torch.addcmul(x, y, self.ls1.gamma)
    return torch.addcmul(x, self.mlp(self.norm2(x)), self.ls2.gamma)


def _patch_embed_gemm(self: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    w = self.proj.weight  # C×3×p×p
    p = w.shape[-1]
    b, c = x.shape[:2]
    gh, gw = x.shape[2] // p, x.shape[3] // p  # the conv leaves a remainder out too
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # cast before the copy: half the bytes to move
        x = x.to(torch.get_autocast_dtype(dev))
    patches = (x[:, :, : gh * p, : gw * p]
               .reshape(b, c, gh, p, gw, p)
               .permute(0, 2, 4, 1, 3, 5)  # B×gh×gw×3×p×p: the weight's (c, ky, kx) order
               .reshape(b, gh * gw, c * p * p))
    return torch.nn.functional.linear(patches, w.flatten(1), self.proj.bias)  # B×N×C


@contextlib.contextmanager
def _patched(cls, name: str, fn):
    original = getattr(cls, name)
    setattr(cls, name, fn)
    try:
        yield
    finally:
        setattr(cls, name, original)


def rein_in_place():
    return _patched(LoRAReins, "update", _rein_update_in_place)


def layer_scale_addcmul():
    return _patched(Block, "forward", _block_addcmul)


def patch_embed_gemm():
    return _patched(PatchEmbed, "forward", _patch_embed_gemm)


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
