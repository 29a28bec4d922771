"""The Rein adapter (``LoRAReins``, reference §1.3).

After every ViT block the patch tokens attend to a small set of learned tokens and are nudged
by the result; the same tokens, pooled over layers, become Mask2Former's object queries.
Nothing here depends on the image except the per-layer update, so the tokens, their value
projections and the queries are computed once and cached (see :meth:`LoRAReins.static`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crossearth_cli.model.attention import attention

__all__ = ["LoRAReins", "ReinStatic"]


@dataclass
class ReinStatic:
    """Image-independent Rein tensors."""

    tokens: torch.Tensor  # L×T×C, T_l = A_l·B_l
    values: torch.Tensor  # L×T×C, row 0 zero (token 0 only normalises), rows 1.. = token2feat
    queries: torch.Tensor  # T×Q, the Mask2Former queries (``return_auto``)


class LoRAReins(nn.Module):
    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        token_length: int,
        lora_dim: int,
        query_dims: int,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.embed_dims = embed_dims
        self.token_length = token_length
        self.scale = nn.Parameter(torch.tensor(1e-3))  # 0-dim, learned
        self.learnable_tokens_a = nn.Parameter(torch.empty(num_layers, token_length, lora_dim))
        self.learnable_tokens_b = nn.Parameter(torch.empty(num_layers, lora_dim, embed_dims))
        self.mlp_token2feat = nn.Linear(embed_dims, embed_dims)
        self.mlp_delta_f = nn.Linear(embed_dims, embed_dims)
        self.transform = nn.Linear(embed_dims, query_dims)
        self.merge = nn.Linear(query_dims * 3, query_dims)
        self._cache: tuple[tuple, ReinStatic] | None = None

    # -- image-independent part -------------------------------------------------------------

    def _static_params(self) -> list[torch.Tensor]:
        return [
            self.learnable_tokens_a,
            self.learnable_tokens_b,
            *self.mlp_token2feat.parameters(),
            *self.transform.parameters(),
            *self.merge.parameters(),
        ]

    def compute_static(self) -> ReinStatic:
        """Tokens, values and queries from the weights, in the weights' dtype (no autocast)."""
        device_type = self.learnable_tokens_a.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            tokens = self.learnable_tokens_a @ self.learnable_tokens_b  # L×T×C
            values = self.mlp_token2feat(tokens[:, 1:])  # L×(T-1)×C
            # token 0 joins the softmax but not the value sum: give it a zero value row
            values = torch.cat([torch.zeros_like(values[:, :1]), values], dim=1)  # L×T×C
            t = self.transform(tokens).permute(1, 2, 0)  # T×Q×L
            pooled = torch.stack(  # T×Q×3, interleaved per channel: 3c+k, k = max, mean, last
                [t.max(dim=-1).values, t.mean(dim=-1), t[..., -1]], dim=-1
            )
            queries = self.merge(pooled.flatten(-2))  # T×Q
        return ReinStatic(tokens=tokens, values=values, queries=queries)

    def static(self) -> ReinStatic:
        """Cached :meth:`compute_static` in eval mode without autograd; recomputed otherwise.

        The cache key holds each weight's storage pointer, version counter, device and dtype,
        so loading new weights, ``.to(device)`` or ``.half()`` all invalidate it.
        """
        if self.training or torch.is_grad_enabled():
            return self.compute_static()
        if torch.compiler.is_compiling():
            # torch.compile cannot trace the key's data_ptr() (a graph break per call): take
            # what an eager call cached, or compute it inside the graph
            return self._cache[1] if self._cache is not None else self.compute_static()
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self._static_params())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.compute_static())
        return self._cache[1]

    def queries(self) -> torch.Tensor:
        return self.static().queries

    # -- per-layer update --------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, layer: int, static: ReinStatic | None = None
    ) -> torch.Tensor:
        """Update the patch tokens of block ``layer``'s output; the cls token passes unchanged.

        x: B×(1+N)×C -> B×(1+N)×C.
        """
        static = static if static is not None else self.static()
        return self.update(x, static.tokens[layer], static.values[layer])

    def update(self, x: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` given one layer's tokens and values (T×C each). Taking the tensors,
        not the layer number, lets ``torch.compile`` trace it once for every layer."""
        cls_tok, f = x[:, :1], x[:, 1:]  # B×1×C, B×N×C
        dev = f.device.type
        ct = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else f.dtype
        b = f.shape[0]
        # softmax over the T tokens of (f·T_lᵀ)·C^-½, then the value sum without token 0
        delta = attention(
            f.to(ct)[:, None],  # B×1×N×C
            tokens.to(ct)[None, None].expand(b, 1, -1, -1),  # B×1×T×C
            values.to(ct)[None, None].expand(b, 1, -1, -1),  # B×1×T×C
            scale=self.embed_dims**-0.5,
        )[:, 0]  # B×N×C
        delta = self.mlp_delta_f(delta + f)  # the residual sits inside the projection
        f = f + self.scale * delta
        return torch.cat([cls_tok.to(f.dtype), f], dim=1)
