"""Mask2Former transformer decoder (masked cross-attention, then self-attention, then FFN).

Post-norm layers with mmcv key names: ``layers.N.{cross_attn,self_attn}.attn.{in_proj_weight,
in_proj_bias,out_proj}``, ``layers.N.ffn.layers.{0.0,1}``, ``layers.N.norms.{0,1,2}``,
``post_norm``. Attention goes through SDPA; the mmdet mask (True = blocked) is inverted there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossearth_cli.model.attention import attention
from crossearth_cli.model.pixel_decoder import FFN

__all__ = ["MultiheadAttention", "DecoderLayer", "TransformerDecoder"]


class _Projections(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` ([q; k; v] rows), run through SDPA."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dims, dims))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dims))
        self.out_proj = nn.Linear(dims, dims)

    def forward(self, q, k, v, allowed=None):
        """q: B×Nq×C, k/v: B×Nk×C, allowed: B×(1|h)×Nq×Nk (True = may attend) -> B×Nq×C."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, nq, c = q.shape
        h = self.heads

        def split(x, w, bias):  # B×N×C -> B×h×N×d
            return F.linear(x, w, bias).view(b, x.shape[1], h, c // h).transpose(1, 2)

        out = attention(split(q, wq, bq), split(k, wk, bk), split(v, wv, bv), allowed=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))


class MultiheadAttention(nn.Module):
    """mmcv ``MultiheadAttention``: positions added to q and k (not v), residual on the query."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.attn = _Projections(dims, heads)

    def forward(self, query, key, value, query_pos, key_pos, allowed=None):
        return query + self.attn(query + query_pos, key + key_pos, value, allowed)


class DecoderLayer(nn.Module):
    def __init__(self, dims: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = MultiheadAttention(dims, heads)
        self.self_attn = MultiheadAttention(dims, heads)
        self.ffn = FFN(dims, ffn_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dims, eps=1e-5) for _ in range(3))

    def forward(self, query, query_pos, memory, memory_pos, allowed):
        """query: B×Q×C; memory: B×HW×C (with level embed), memory_pos: 1×HW×C;
        allowed: B×(1|h)×Q×HW, True = may attend."""
        query = self.cross_attn(query, memory, memory, query_pos, memory_pos, allowed)
        query = self.norms[0](query)
        query = self.norms[1](self.self_attn(query, query, query, query_pos, query_pos))
        return self.norms[2](self.ffn(query))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, dims: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dims, heads, ffn_dim) for _ in range(num_layers))
        self.post_norm = nn.LayerNorm(dims, eps=1e-5)
