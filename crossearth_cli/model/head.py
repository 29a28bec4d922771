"""Rein's Mask2Former head (``ReinMask2FormerHead``, reference §1.4-1.5).

The Rein queries replace Mask2Former's learned query embeddings: they are the positional part
in every decoder layer, and ``querys2feat`` of them is the initial content. The head returns
the last layer's class logits and mask logits; :func:`semantic_scores` turns them into mmseg's
per-pixel class scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossearth_cli.model.config import CrossEarthConfig
from crossearth_cli.model.optional_kernel import OptionalKernel, on_triton
from crossearth_cli.model.pixel_decoder import PixelDecoder
from crossearth_cli.model.positional import sine_position_encoding
from crossearth_cli.model.transformer_decoder import TransformerDecoder

__all__ = ["ReinMask2FormerHead", "level_mask_features", "semantic_scores"]


class ReinMask2FormerHead(nn.Module):
    def __init__(self, config: CrossEarthConfig) -> None:
        super().__init__()
        c = config
        d = c.feat_channels
        self.num_heads = c.dec_heads
        self.num_levels = c.num_levels
        self.pixel_decoder = PixelDecoder(
            in_channels=c.embed_dim,
            feat_channels=d,
            mask_channels=c.mask_channels,
            num_layers=c.enc_layers,
            heads=c.enc_heads,
            points=c.enc_points,
            ffn_dim=c.enc_ffn_dim,
            gn_groups=c.gn_groups,
            num_levels=c.num_levels,
        )
        self.transformer_decoder = TransformerDecoder(c.dec_layers, d, c.dec_heads, c.dec_ffn_dim)
        self.level_embed = nn.Embedding(c.num_levels, d)
        self.cls_embed = nn.Linear(d, c.num_classes + 1)  # last column: "no object"
        self.mask_embed = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, c.mask_channels)
        )
        self.querys2feat = nn.Linear(d, d)

    def _mask_logits(self, out: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """B×Q×C decoder output -> B×Q×H4×W4 mask logits."""
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)

    def _allowed(self, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Attention mask for the next layer: B×1×Q×(h·w), True = may attend. ``mask_logits``
        are resized to ``size`` first unless they have it already.

        mmdet blocks a position when sigmoid(resized logit) < 0.5 and then un-blocks rows that
        are blocked everywhere; SDPA wants the opposite convention.
        """
        m = shrink_bilinear(mask_logits, size)  # float32
        allowed = ~(m.flatten(2).sigmoid() < 0.5)  # B×Q×hw
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # fully blocked rows → all open
        return allowed[:, None]  # B×1×Q×hw, broadcast over the heads

    def forward(
        self,
        feats: list[torch.Tensor],
        queries: torch.Tensor,
        scales: tuple[float, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [s4, s8, s16, s32] (or stride-16 maps with their ``scales``), queries Q×D
        -> (cls logits B×Q×(C+1), masks B×Q×H4×W4)."""
        mask_features, mems = self.pixel_decoder(feats, scales)
        b = mask_features.shape[0]
        d = self.querys2feat.in_features
        memories, memory_pos, sizes = [], [], []
        for i, m in enumerate(mems):  # s32, s16, s8
            hl, wl = m.shape[-2:]
            memories.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i])  # B×hw×D
            pos = sine_position_encoding(hl, wl, d // 2, device=m.device)
            memory_pos.append(pos.flatten(2).transpose(1, 2).to(memories[-1].dtype))  # 1×hw×D
            sizes.append((int(hl), int(wl)))

        level_features = [level_mask_features(mask_features, size) for size in sizes]

        query_pos = queries[None].expand(b, -1, -1)  # B×Q×D, the same in every layer
        query = self.querys2feat(query_pos)
        post_norm = self.transformer_decoder.post_norm
        allowed = self._allowed(self._mask_logits(post_norm(query), level_features[0]), sizes[0])
        layers = self.transformer_decoder.layers
        for i, layer in enumerate(layers):
            lvl = i % self.num_levels
            query = layer(query, query_pos, memories[lvl], memory_pos[lvl], allowed)
            if i + 1 < len(layers):  # the mask after the last layer is never used
                nxt = (i + 1) % self.num_levels
                logits = self._mask_logits(post_norm(query), level_features[nxt])
                allowed = self._allowed(logits, sizes[nxt])
        out = post_norm(query)
        return self.cls_embed(out), self._mask_logits(out, mask_features)


def level_mask_features(mask_features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The mask features resized to a level, B×M×h×w, for that level's attention masks.

    mmdet resizes each layer's B×Q×H4×W4 mask logits to the level. The resize is linear and
    acts on each channel alone, so it commutes with the einsum over channels: the logits of
    the resized features are the resized logits, up to rounding, at 4 to 64 times less work
    per layer (and the features are resized once per forward, not once per layer)."""
    return shrink_bilinear(mask_features, size).to(mask_features.dtype)


def _every_kth(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Bilinear (align_corners=False) shrink by a whole factor k along ``dim``, float32: the
    sample at k·i + (k−1)/2 is one pixel for odd k and the mean of two for even k."""
    first = x.narrow(dim, (k - 1) // 2, x.shape[dim] - (k - 1) // 2)
    picked = first.unfold(dim, 1, k).squeeze(-1).float() if k > 1 else x.float()
    if k % 2:
        return picked
    second = x.narrow(dim, k // 2, x.shape[dim] - k // 2).unfold(dim, 1, k).squeeze(-1)
    return (picked + second.float()) * 0.5


def shrink_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x.float(), size, mode="bilinear", align_corners=False)``.

    When ``size`` divides x's height and width, the sampling weights are 1 or ½ and the
    result is read off by slicing (along the width, then the height, as CUDA's kernel adds
    them: the same float32 numbers on an H100; the CPU kernel adds the four samples in another
    order, so there they differ by up to one ulp, 1.2e-7). PyTorch's NCHW kernel loops over all
    B·Q channels in each output pixel's thread: on an H100 the decoder's nine mask resizes
    took 6.4 ms of a 16-tile batch that way. Other sizes fall back to F.interpolate.
    """
    (big_h, big_w), (h, w) = x.shape[-2:], size
    if h <= 0 or w <= 0 or big_h % h or big_w % w:
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return _every_kth(_every_kth(x, x.ndim - 1, big_w // w), x.ndim - 2, big_h // h)


FUSED_SEMANTIC = OptionalKernel("fused semantic inference", "crossearth_cli.model.semantic_triton",
                                "semantic_scores_fused", "CROSSEARTH_FUSED_SEMANTIC")


def semantic_scores(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    size: tuple[int, int],
    crop: tuple[int, int] | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """mmseg's per-pixel scores: softmax over classes without the no-object column (not
    renormalised) times the sigmoid of the mask logits bilinearly upsampled to ``size``.

    ``crop`` keeps only the top-left (h, w) of the result (padding removal) before the einsum.
    Runs in float32 whatever the autocast state; B×Q×(C+1), B×Q×h×w -> B×C×h×w float32.
    ``fused``: in one Triton kernel (``semantic_triton``; None: on CUDA with no gradient).
    """
    if fused is None:
        fused = on_triton(mask_logits)
    if fused and (out := FUSED_SEMANTIC.call(cls_logits, mask_logits, size, crop)) is not None:
        return out
    dev = mask_logits.device
    with torch.autocast(device_type=dev.type, enabled=False):
        probs = cls_logits.float().softmax(dim=-1)[..., :-1]  # B×Q×C
        b, q, c = probs.shape
        h, w = crop if crop is not None else size
        out = torch.empty(b, c, h, w, dtype=torch.float32, device=dev)
        for i in range(b):  # one image at a time bounds Q×H×W memory
            m = F.interpolate(
                mask_logits[i : i + 1].float(), size=size, mode="bilinear", align_corners=False
            )[0]  # Q×H×W, a fresh tensor: sigmoid in place unless cropped (a view)
            m = m[:, :h, :w].sigmoid() if crop is not None else m.sigmoid_()
            # Σ_q probs[q, c] · m[q] for every class, straight into the output
            torch.matmul(probs[i].t(), m.reshape(q, h * w), out=out[i].view(c, h * w))
        return out
