"""Multi-scale deformable attention in pure PyTorch (mmcv ``MultiScaleDeformableAttention``).

Each query looks at a few learned points around its reference point on every level; the value
at each point is read with bilinear ``grid_sample`` (zero padding, align_corners=False) and the
points are mixed with softmaxed weights. The CUDA kernel of the original gives the same numbers
up to rounding. Sampling always runs in float32: bf16 locations would be off by whole pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformAttn", "ms_deform_attn_core"]


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The sampling and weighted sum.

    value: B×S×h×d, S = Σ H_l·W_l, levels flattened row-major in ``spatial_shapes`` order.
    sampling_locations: B×Nq×h×L×P×2, (x, y) in [0, 1] (cell edges at 0 and 1).
    attention_weights: B×Nq×h×L×P (already softmaxed over L·P).
    -> B×Nq×(h·d), in value's dtype.
    """
    b, _, nh, d = value.shape
    _, nq, _, nl, npts, _ = sampling_locations.shape
    out_dtype = value.dtype
    value = value.float()
    grids = (2 * sampling_locations.float() - 1).transpose(1, 2).flatten(0, 1)  # (B·h)×Nq×L×P×2
    w = attention_weights.float().transpose(1, 2).reshape(b * nh, nq, nl, npts)
    out = None
    start = 0
    # Level by level: sample, then weight and sum the points at once; never materialise all
    # levels' samples together (that stack dominated the pixel decoder's GPU time).
    for lvl, (hl, wl) in enumerate(spatial_shapes):
        v = value[:, start : start + hl * wl]  # B×HW×h×d
        start += hl * wl
        v = v.permute(0, 2, 3, 1).reshape(b * nh, d, hl, wl)  # (B·h)×d×H×W
        s = F.grid_sample(
            v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B·h)×d×Nq×P
        part = torch.einsum("bdqp,bqp->bdq", s, w[:, :, lvl])  # (B·h)×d×Nq
        out = part if out is None else out.add_(part)
    out = out.reshape(b, nh * d, nq).transpose(1, 2)  # B×Nq×(h·d)
    return out.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Deformable self-attention over the flattened levels, with the residual (mmcv layout)."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query: B×S×C (also the value, without position), query_pos: (1|B)×S×C,
        reference_points: (1|B)×S×L×2 normalised (x, y). -> B×S×C = query + attention."""
        b, s, c = query.shape
        h, nl, npts = self.num_heads, self.num_levels, self.num_points
        q = query + query_pos
        value = self.value_proj(query).view(b, s, h, c // h)
        offsets = self.sampling_offsets(q).view(b, s, h, nl, npts, 2)  # heads→levels→points→xy
        weights = self.attention_weights(q).view(b, s, h, nl * npts).float().softmax(-1)
        weights = weights.view(b, s, h, nl, npts)
        # offsets are in cells of each level: divide by (W_l, H_l)
        normalizer = torch.tensor(
            [[wl, hl] for hl, wl in spatial_shapes], dtype=torch.float32, device=query.device
        )  # L×2
        loc = (
            reference_points.float()[:, :, None, :, None, :]
            + offsets.float() / normalizer[None, None, None, :, None, :]
        )  # B×S×h×L×P×2
        out = ms_deform_attn_core(value, spatial_shapes, loc, weights)
        return query + self.output_proj(out)
