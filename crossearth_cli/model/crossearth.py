"""The whole network: normalised RGB in, mmseg class scores out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossearth_cli.model.backbone import FEATURE_SCALES, ReinsDinoVisionTransformer
from crossearth_cli.model.config import CheckpointInfo, CrossEarthConfig
from crossearth_cli.model.head import ReinMask2FormerHead, semantic_scores

__all__ = ["CrossEarth", "build_model", "padded_size"]

def padded_size(h: int, w: int, patch: int = 16) -> tuple[int, int]:
    """Size the network actually runs at: the next multiple of the patch, at least 2 patches.

    Multiples of the patch ≥ 2 patches run unpadded (the reference path: 512, 1024, 384×512 …).
    Two patches is the smallest grid whose ×0.5 (stride-32) map is not empty.
    """

    def up(n: int) -> int:
        return max(2 * patch, -(-n // patch) * patch)

    return up(h), up(w)


class CrossEarth(nn.Module):
    """DINOv2-L + Rein + Mask2Former with mmseg's semantic inference.

    ``forward(x)``: x is float B×3×H×W, RGB, normalised with the ImageNet mean/std on the
    0-255 scale, any H, W (even 1×1). Returns float32 B×C×H×W scores (softmax over classes without
    the no-object column, times the sigmoid of the upsampled masks, summed over queries; so
    0 ≤ score ≤ number of queries). Sizes that are not multiples of 16 are padded at the
    bottom/right with zeros (the mean colour) and the scores cropped back.
    """

    def __init__(self, config: CrossEarthConfig, info: CheckpointInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.info = info if info is not None else CheckpointInfo()
        self.backbone = ReinsDinoVisionTransformer(config)
        self.decode_head = ReinMask2FormerHead(config)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last decoder layer's (class logits B×Q×(C+1), mask logits B×Q×H/4×W/4).

        x must already be a multiple of the patch size on both sides.
        """
        maps, queries = self.backbone.forward_maps(x)
        return self.decode_head(maps, queries, FEATURE_SCALES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected B×3×H×W, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        weight_dtype = self.backbone.pos_embed.dtype
        if x.dtype != weight_dtype:
            x = x.to(weight_dtype)
        ph, pw = padded_size(h, w, self.config.patch_size)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))  # zeros = the mean colour after normalising
        cls_logits, mask_logits = self.forward_logits(x)
        return semantic_scores(cls_logits, mask_logits, size=(ph, pw), crop=(h, w))


def build_model(config: CrossEarthConfig, info: CheckpointInfo | None = None) -> CrossEarth:
    """An untrained model (PyTorch default init) in eval mode; use load_checkpoint for weights."""
    return CrossEarth(config, info).eval()
