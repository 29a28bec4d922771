"""DINOv2 ViT (patch 16 after conversion) with the Rein adapter after every block (§1.2).

The blocks are timm's stock ``Block`` (pre-norm, LayerScale, exact GELU, LayerNorm eps 1e-6)
with our attention module so the kernel choice lives in one place. Parameter names match the
official ``backbone.*`` keys, including the unused ``mask_token`` and final ``norm``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from crossearth_cli.model.attention import attention
from crossearth_cli.model.config import CrossEarthConfig
from crossearth_cli.model.optional_kernel import OptionalKernel, on_triton
from crossearth_cli.model.reins import LoRAReins

__all__ = ["ViTAttention", "PatchEmbed", "ReinsDinoVisionTransformer", "interpolate_pos_embed",
           "FUSED_VIT"]

# CROSSEARTH_FUSED_VIT=0 keeps the eager blocks on CUDA too
FUSED_VIT = OptionalKernel("fused ViT kernels", "crossearth_cli.model.vit_triton",
                           "fused_forward_features", "CROSSEARTH_FUSED_VIT")


class ViTAttention(nn.Module):
    """Multi-head self-attention with fused qkv ([q; k; v] rows, heads of 64)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        device=None,
        dtype=None,
        **_: object,  # timm passes qk_norm/norm_layer/dropout/depth; all off here
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B×h×N×d
        out = attention(q, k, v)  # B×h×N×d, scale d^-½
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PatchEmbed(nn.Module):
    """k = s = patch conv; B×3×H×W -> B×(H/p·W/p)×C, row-major."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, gemm: bool | None = None) -> torch.Tensor:
        """``gemm``: as one GEMM over the image cut into patches (None: on CUDA under autocast,
        where cuDNN ran the convolution at ~19 TFLOP/s: 1.35 ms of a 16-tile ViT-L batch on an
        H100; same tokens to rounding)."""
        if gemm is None:
            gemm = x.is_cuda and torch.is_autocast_enabled("cuda")
        if not gemm:
            return self.proj(x).flatten(2).transpose(1, 2)
        w = self.proj.weight  # C×3×p×p
        p = w.shape[-1]
        b, c = x.shape[:2]
        gh, gw = x.shape[2] // p, x.shape[3] // p  # the convolution leaves a remainder out too
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # cast before the copy: half the bytes to move
            x = x.to(torch.get_autocast_dtype(dev))
        patches = (x[:, :, : gh * p, : gw * p]
                   .reshape(b, c, gh, p, gw, p)
                   .permute(0, 2, 4, 1, 3, 5)  # B×gh×gw×3×p×p: the weight's (c, ky, kx) order
                   .reshape(b, gh * gw, c * p * p))
        return F.linear(patches, w.flatten(1), self.proj.bias)  # B×N×C


def interpolate_pos_embed(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Fit the stored pos-embed (1×(1+G²)×C) to a gh×gw token grid, DINOv2/mmseg style.

    Used as stored when the grid is the stored square grid. Otherwise the patch part is resized
    bicubically with ``scale_factor=((gh+0.1)/G, (gw+0.1)/G)`` -- not ``size=`` -- because
    PyTorch maps coordinates with the given scale, and that is what the model was run with.
    Computed in float32; returns float32.
    """
    n = pos_embed.shape[1] - 1
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    pos = pos_embed.float()
    if gh == gw == g:
        return pos
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    c = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, g, g, c).permute(0, 3, 1, 2)  # 1×C×G×G
    patch_pos = F.interpolate(
        patch_pos,
        scale_factor=((gh + 0.1) / g, (gw + 0.1) / g),
        mode="bicubic",
        align_corners=False,
    )
    if patch_pos.shape[-2:] != (gh, gw):  # floor((n+0.1)/G·G) == n always; guard anyway
        raise AssertionError(f"pos-embed resize gave {tuple(patch_pos.shape[-2:])}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, c)
    return torch.cat([cls_pos, patch_pos], dim=1)


FEATURE_SCALES = (4.0, 2.0, 1.0, 0.5)  # blocks 7, 11, 15, 23 → strides 4, 8, 16, 32


def resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's pyramid resize: bilinear, ``scale_factor``, align_corners=False."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


class ReinsDinoVisionTransformer(nn.Module):
    def __init__(self, config: CrossEarthConfig) -> None:
        super().__init__()
        c = config
        self.patch_size = c.patch_size
        self.embed_dim = c.embed_dim
        self.out_indices = tuple(c.out_indices)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.grid_size**2, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, c.embed_dim))  # unused at inference
        self.patch_embed = PatchEmbed(c.patch_size, c.embed_dim)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(
                dim=c.embed_dim,
                num_heads=c.num_heads,
                mlp_ratio=c.mlp_dim / c.embed_dim,
                qkv_bias=True,
                proj_bias=True,
                init_values=1e-5,
                act_layer=nn.GELU,  # exact erf GELU
                norm_layer=norm_layer,
                mlp_layer=Mlp,
                attn_layer=ViTAttention,
            )
            for _ in range(c.depth)
        )
        for blk in self.blocks:  # int(dim * ratio) could round down for odd ratios
            if blk.mlp.fc1.out_features != c.mlp_dim:
                raise ValueError(f"mlp_dim {c.mlp_dim} not reachable from embed {c.embed_dim}")
        self.norm = norm_layer(c.embed_dim)  # stored in checkpoints, not applied (§1.2)
        self.reins = LoRAReins(
            num_layers=c.depth,
            embed_dims=c.embed_dim,
            token_length=c.token_length,
            lora_dim=c.lora_dim,
            query_dims=c.feat_channels,
        )

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """B×3×H×W (H, W multiples of the patch) -> B×(1+gh·gw)×C with cls and positions."""
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        t = self.patch_embed(x)  # B×N×C
        t = torch.cat([self.cls_token.expand(b, -1, -1).to(t.dtype), t], dim=1)
        return t + interpolate_pos_embed(self.pos_embed, gh, gw).to(t.dtype), gh, gw

    def forward_features(self, x: torch.Tensor, use_rein: bool = True,
                         fused: bool | None = None) -> list[torch.Tensor]:
        """Maps after the blocks in ``out_indices`` (post-Rein, no final norm): 4 × B×C×gh×gw.

        ``fused``: the element-wise passes through ``vit_triton``'s kernels (None: on CUDA under
        autocast with no gradient, when Triton imports; the same numbers to rounding)."""
        if fused is None:
            fused = on_triton(x) and torch.is_autocast_enabled(x.device.type)
        if use_rein and fused and (maps := FUSED_VIT.call(self, x)) is not None:
            return maps
        t, gh, gw = self.tokens(x)
        b = t.shape[0]
        static = self.reins.static() if use_rein else None
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if use_rein:
                t = self.reins.update(t, static.tokens[i], static.values[i])
            if i in self.out_indices:
                for _ in range(self.out_indices.count(i)):
                    outs.append(t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw))
        return outs

    def forward_maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (the 4 maps at stride 16, before their ×4, ×2, ×1, ×0.5 resize), queries T×Q.

        The pixel decoder applies its 1×1 convolutions first and resizes after: bilinear resizing
        and a 1×1 convolution commute, and 256 channels are 4× cheaper to resize than 1024.
        """
        return self.forward_features(x), self.reins.queries()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> ([s4, s8, s16, s32] maps, each B×C×·×·), Rein queries T×Q (reference order)."""
        maps, queries = self.forward_maps(x)
        return [resize(m, s) for m, s in zip(maps, FEATURE_SCALES)], queries
