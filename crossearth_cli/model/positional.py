"""Parameter-free sine positional encoding (mmdet ``SinePositionalEncoding``, normalize=True).

Used by the pixel decoder (encoder queries) and the transformer decoder (memory keys). The
padding mask is always empty at inference, so the encoding depends only on the map size.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sine_position_encoding"]


def sine_position_encoding(
    height: int,
    width: int,
    num_feats: int,
    device: torch.device | str | None = None,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Return the 1×(2·num_feats)×H×W encoding in float32; the y half comes first.

    Row i (1-based after the cumulative sum) maps to i / (H + eps) · 2π, column j likewise; each
    of the num_feats channels divides by temperature^(2·⌊k/2⌋/num_feats) and takes sin on even
    channels, cos on odd ones.
    """
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y_embed = y_embed / (y_embed[-1:] + eps) * scale  # H
    x_embed = x_embed / (x_embed[-1:] + eps) * scale  # W
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def encode(e: torch.Tensor) -> torch.Tensor:  # L -> L×num_feats, sin/cos interleaved
        p = e[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y_embed)[:, None, :].expand(height, width, num_feats)  # H×W×F
    pos_x = encode(x_embed)[None, :, :].expand(height, width, num_feats)  # H×W×F
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).unsqueeze(0).contiguous()
