"""Architecture hyper-parameters and what a checkpoint says about itself.

Kept free of torch so the CLI can describe models without importing it. Every number here has
a default equal to the released CrossEarth ViT-L model (reference §1); :func:`infer_config` in
:mod:`crossearth_cli.model.checkpoint` fills a config from tensor shapes, so a tiny test model
and the real one go through the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CrossEarthConfig", "CheckpointInfo", "default_out_indices"]


def default_out_indices(depth: int) -> tuple[int, int, int, int]:
    """Blocks whose outputs feed the pyramid: about 1/3, 1/2, 2/3 of the depth, and the last.

    For depth 24 this gives the official (7, 11, 15, 23); for 12 it gives (3, 5, 7, 11) and for
    4 it gives (0, 1, 2, 3). Depths under 4 repeat blocks, which is harmless.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    picks = ((depth + 1) // 3 - 1, depth // 2 - 1, (2 * depth + 1) // 3 - 1, depth - 1)
    return tuple(max(0, i) for i in picks)  # type: ignore[return-value]


@dataclass(frozen=True)
class CrossEarthConfig:
    """Shape of a DINOv2 + Rein + Mask2Former model. Defaults: the released ViT-L, 6 classes."""

    num_classes: int = 6
    # backbone (DINOv2 ViT, converted to patch 16)
    img_size: int = 512  # stored pos-embed grid is img_size // patch_size per side
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16  # embed_dim // 64 in every DINOv2 size
    mlp_dim: int = 4096
    out_indices: tuple[int, ...] = (7, 11, 15, 23)
    # Rein adapter
    token_length: int = 100
    lora_dim: int = 16
    # Mask2Former head
    feat_channels: int = 256  # also the Rein query dimension
    mask_channels: int = 256  # mask embedding ("out_channels")
    num_queries: int = 100  # always token_length: the Rein tokens are the queries
    enc_layers: int = 6
    enc_heads: int = 8
    enc_points: int = 4
    enc_ffn_dim: int = 1024
    dec_layers: int = 9
    dec_heads: int = 8
    dec_ffn_dim: int = 2048
    num_levels: int = 3  # feature levels seen by the encoder and the decoder (s32, s16, s8)
    gn_groups: int = 32

    def __post_init__(self) -> None:
        problems = []
        if self.num_queries != self.token_length:
            problems.append(
                f"num_queries ({self.num_queries}) must equal token_length ({self.token_length})"
            )
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")
        if self.feat_channels % self.enc_heads or self.feat_channels % self.dec_heads:
            problems.append(f"feat_channels {self.feat_channels} not divisible by the head count")
        if self.feat_channels % self.gn_groups:
            problems.append(f"feat_channels {self.feat_channels} not divisible by {self.gn_groups}")
        if self.feat_channels % 2:
            problems.append("feat_channels must be even (sine positional encoding)")
        if self.num_levels != 3:
            problems.append("num_levels must be 3 (four backbone maps: three encoder levels + s4)")
        idx = list(self.out_indices)
        if len(idx) != 4 or any(not 0 <= i < self.depth for i in idx) or idx != sorted(idx):
            problems.append(
                f"out_indices {self.out_indices} must be 4 ascending block indices < {self.depth}"
            )
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} not a multiple of patch {self.patch_size}")
        if self.num_classes < 1:
            problems.append("num_classes must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Side of the stored pos-embed grid (32 for img 512, 64 for img 1024)."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_indices"] = list(self.out_indices)
        return d


@dataclass
class CheckpointInfo:
    """What a checkpoint file says about itself, for the CLI and the writers.

    ``classes``/``palette`` come from ``meta.dataset_meta`` (mmengine), the safetensors
    metadata written by ``convert-checkpoint``, or the preset whose file name matches.
    ``crop_size``/``stride`` come from the training config text (``meta.cfg``), the metadata,
    or the preset; ``None`` when unknown (then ``config.img_size`` is the natural crop).
    ``warnings`` are one-line notes the CLI prints (dropped training extras, NaN weights, ...).
    """

    source: str = ""
    classes: list[str] | None = None
    palette: list[tuple[int, int, int]] | None = None
    crop_size: int | None = None
    stride: int | None = None
    bands: str | None = None  # "RGB", "IRRG" or None
    preset: str | None = None  # name of the matching preset, when one was used
    dropped_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
