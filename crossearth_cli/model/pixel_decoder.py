"""Mask2Former pixel decoder (mmdet ``MSDeformAttnPixelDecoder``, reference §1.4).

Three coarse levels (s32, s16, s8) are refined together by a deformable-attention encoder;
the finest backbone map (s4) is merged FPN-style to give the per-pixel mask features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossearth_cli.model.ms_deform_attn import MSDeformAttn
from crossearth_cli.model.positional import sine_position_encoding

__all__ = ["ConvGN", "FFN", "EncoderLayer", "PixelDecoder", "reference_points"]


class ConvGN(nn.Module):
    """Conv → GroupNorm(eps 1e-5) → optional ReLU (mmcv ``ConvModule`` key names)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, bias: bool, groups: int, relu: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, cout, eps=1e-5)
        self.relu = relu

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale``: bilinear resize between the convolution and the norm (see
        ``ReinsDinoVisionTransformer.forward_maps``: for a 1×1 convolution this equals resizing
        the input first)."""
        x = self.conv(x)
        if scale != 1:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        x = self.gn(x)
        return F.relu(x) if self.relu else x


class FFN(nn.Module):
    """Linear → ReLU → Linear with the residual (mmcv ``FFN``: keys layers.0.0, layers.1)."""

    def __init__(self, dims: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dims, hidden), nn.ReLU()), nn.Linear(hidden, dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class EncoderLayer(nn.Module):
    """Post-norm: x = norm0(x + MSDA(x + pos)); x = norm1(x + FFN(x))."""

    def __init__(self, dims: int, heads: int, levels: int, points: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dims, heads, levels, points)
        self.ffn = FFN(dims, ffn_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dims, eps=1e-5) for _ in range(2))

    def forward(self, x, pos, ref, shapes):
        x = self.norms[0](self.self_attn(x, pos, ref, shapes))
        return self.norms[1](self.ffn(x))


class _Encoder(nn.Module):
    def __init__(self, num_layers: int, **kw) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**kw) for _ in range(num_layers))

    def forward(self, x, pos, ref, shapes):
        """x: B×S×D tokens of all levels, pos: 1×S×D, ref: 1×S×L×2 -> B×S×D."""
        for layer in self.layers:
            x = layer(x, pos, ref, shapes)
        return x


def reference_points(shapes: list[tuple[int, int]], device) -> torch.Tensor:
    """Centre of each token's own cell, ((j+0.5)/W_l, (i+0.5)/H_l), levels concatenated: S×2."""
    pts = []
    for hl, wl in shapes:
        y = (torch.arange(hl, dtype=torch.float32, device=device) + 0.5) / hl
        x = (torch.arange(wl, dtype=torch.float32, device=device) + 0.5) / wl
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
    return torch.cat(pts, dim=0)


class PixelDecoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        feat_channels: int,
        mask_channels: int,
        num_layers: int,
        heads: int,
        points: int,
        ffn_dim: int,
        gn_groups: int,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.feat_channels = feat_channels
        self.input_convs = nn.ModuleList(  # 1×1 with bias, GN, no activation
            ConvGN(in_channels, feat_channels, 1, True, gn_groups, False) for _ in range(num_levels)
        )
        self.encoder = _Encoder(
            num_layers,
            dims=feat_channels,
            heads=heads,
            levels=num_levels,
            points=points,
            ffn_dim=ffn_dim,
        )
        self.level_encoding = nn.Embedding(num_levels, feat_channels)
        self.lateral_convs = nn.ModuleList(
            [ConvGN(in_channels, feat_channels, 1, False, gn_groups, False)]
        )
        self.output_convs = nn.ModuleList(
            [ConvGN(feat_channels, feat_channels, 3, False, gn_groups, True)]
        )
        self.mask_feature = nn.Conv2d(feat_channels, mask_channels, 1)

    def forward(
        self, feats: list[torch.Tensor], scales: tuple[float, ...] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feats: [s4, s8, s16, s32] -> (mask features B×M×H/4×W/4, [s32, s16, s8] memories).

        With ``scales``, feats are the backbone's stride-16 maps and each is resized by its
        scale after its 1×1 convolution instead of before (same result, far less work).
        """
        scales = scales or (1.0,) * len(feats)
        levels = [(feats[3], scales[3]), (feats[2], scales[2]), (feats[1], scales[1])]
        b = feats[0].shape[0]
        tokens, poses, shapes = [], [], []
        for i, (f, scale) in enumerate(levels):  # coarse → fine; input_convs[i] ↔ level i
            x = self.input_convs[i](f, scale)  # B×D×h×w
            hl, wl = x.shape[-2:]
            pos = sine_position_encoding(hl, wl, self.feat_channels // 2, device=x.device)
            pos = pos + self.level_encoding.weight[i].float().view(1, -1, 1, 1)
            tokens.append(x.flatten(2).transpose(1, 2))  # B×hw×D
            poses.append(pos.flatten(2).transpose(1, 2))  # 1×hw×D
            shapes.append((int(hl), int(wl)))
        x = torch.cat(tokens, dim=1)  # B×S×D
        pos = torch.cat(poses, dim=1).to(x.dtype)  # 1×S×D
        ref = reference_points(shapes, x.device)[None, :, None, :]  # 1×S×1×2, same on all levels
        ref = ref.expand(1, -1, self.num_levels, 2)
        x = self.encoder(x, pos, ref, shapes)
        mems, start = [], 0
        for hl, wl in shapes:  # back to maps: [s32, s16, s8]
            mems.append(x[:, start : start + hl * wl].transpose(1, 2).reshape(b, -1, hl, wl))
            start += hl * wl
        y = self.lateral_convs[0](feats[0], scales[0])
        y = y + F.interpolate(mems[-1], size=y.shape[-2:], mode="bilinear", align_corners=False)
        y = self.output_convs[0](y)
        return self.mask_feature(y), mems
