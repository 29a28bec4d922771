"""Random-weight models in the official checkpoint format, for tests, demos and benchmarks.

No hub, no network: :func:`write_random_checkpoint` writes files that :func:`load_checkpoint`
reads exactly like a released one (mmengine dict with ``meta.dataset_meta``, bare state dict,
safetensors, or a split Rein+head file with its backbone beside it).

Weights are scaled so the model does something visible: LayerScale gammas 0.2-0.5 instead of
1e-5, a Rein scale of 0.3, unit-size Rein tokens, and class logits with spread, so scores vary
over classes and pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from crossearth_cli import presets
from crossearth_cli.model.config import CrossEarthConfig, default_out_indices

__all__ = [
    "tiny_config",
    "vit_large_config",
    "random_state_dict",
    "write_random_checkpoint",
    "split_backbone_path",
    "ISPRS_CLASSES",
    "ISPRS_PALETTE",
]

ISPRS_CLASSES = list(presets.ISPRS_CLASSES)
ISPRS_PALETTE = list(presets.ISPRS_PALETTE)


def tiny_config(num_classes: int = 6, **overrides) -> CrossEarthConfig:
    """A very small model of the same architecture: embed 64 (one head), 4 blocks, 64-wide head.

    Its 512×512 forward takes a fraction of a second on a CPU.
    """
    kw = dict(
        num_classes=num_classes,
        img_size=512,
        embed_dim=64,
        depth=4,
        mlp_dim=128,  # MLP ratio 2 (ViT-L has 4)
        token_length=10,
        num_queries=10,
        lora_dim=4,
        feat_channels=64,  # GroupNorm(32) needs ≥ 2 values per group on a 1×1 map
        mask_channels=32,
        enc_layers=2,
        enc_ffn_dim=64,
        dec_layers=3,
        dec_ffn_dim=64,
    )
    kw.update(overrides)
    kw.setdefault("out_indices", default_out_indices(kw["depth"]))
    kw.setdefault("num_heads", max(1, kw["embed_dim"] // 64))  # what infer_config assumes
    if "token_length" in overrides and "num_queries" not in overrides:
        kw["num_queries"] = kw["token_length"]
    return CrossEarthConfig(**kw)


def vit_large_config(num_classes: int = 6, img_size: int = 512) -> CrossEarthConfig:
    """The released architecture (reference §1): ViT-L/16, 100 Rein tokens, 6+9 layer head."""
    return CrossEarthConfig(num_classes=num_classes, img_size=img_size)


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    def randn(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("reins.scale"):
        return torch.tensor(0.3)
    if key.endswith("learnable_tokens_a"):
        return randn(1.0)
    if key.endswith("learnable_tokens_b"):
        return randn(shape[-2] ** -0.5)  # so A·B has unit-size entries
    if leaf == "gamma":  # LayerScale
        return 0.2 + 0.3 * torch.rand(shape, generator=gen)
    if key.endswith(("cls_token", "mask_token")):
        return randn(0.02)
    if key.endswith("pos_embed"):
        return randn(0.2)
    if key.endswith(("level_embed.weight", "level_encoding.weight")):
        return randn(0.5)
    is_norm = any(p in key for p in (".norm", "norm1", "norm2", ".gn.", "post_norm", ".norms."))
    if is_norm and len(shape) == 1:
        return randn(0.1, 1.0) if leaf == "weight" else randn(0.05)
    if leaf in ("bias", "in_proj_bias"):
        return randn(0.02)
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        std = fan_in**-0.5
        if "cls_embed" in key:
            std *= 2.0  # confident class probabilities
        if "transformer_decoder" in key and ("out_proj" in key or "ffn.layers.1" in key):
            std *= 0.3  # keep each query's own content: otherwise all queries look alike
        if "mask_embed.4" in key:
            std *= 3.0  # decisive masks, so different queries win in different places
        if "sampling_offsets" in key:
            std *= 2.0  # offsets of a cell or two
        return randn(std)
    return randn(0.02)


def random_state_dict(config: CrossEarthConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official keys (``backbone.*``, ``decode_head.*``) with seeded random float32 weights."""
    from crossearth_cli.model.crossearth import CrossEarth

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CrossEarth(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: _init_tensor(k, s, gen).float().contiguous() for k, s in shapes.items()}


def split_backbone_path(path: str | Path) -> Path:
    """Where ``fmt="split"`` puts the flat backbone: ``<stem>_dinov2_converted.pth`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}_dinov2_converted.pth")


def _default_classes(n: int) -> list[str]:
    return list(ISPRS_CLASSES) if n == 6 else [f"class_{i}" for i in range(n)]


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    if n == 6:
        return list(ISPRS_PALETTE)
    return [((37 * i + 80) % 256, (91 * i + 40) % 256, (151 * i + 200) % 256) for i in range(n)]


def _cfg_text(config: CrossEarthConfig) -> str:
    crop = config.img_size
    stride = round(crop * 2 / 3)
    return (
        "model = dict(\n"
        f"    backbone=dict(type='ReinsDinoVisionTransformer', img_size={crop}, patch_size=16),\n"
        f"    decode_head=dict(type='ReinMask2FormerHead', num_classes={config.num_classes}),\n"
        f"    test_cfg=dict(crop_size=({crop}, {crop},), mode='slide',\n"
        f"                  stride=({stride}, {stride},)))\n"
    )


def write_random_checkpoint(
    path: str | Path,
    config: CrossEarthConfig | None = None,
    seed: int = 0,
    fmt: str = "mmengine",
    classes: list[str] | None = None,
    palette: list[tuple[int, int, int]] | None = None,
) -> Path:
    """Write a random-weight checkpoint and return ``path``.

    fmt: ``"mmengine"`` ({"meta": {"dataset_meta", "cfg", ...}, "state_dict"}, torch.save),
    ``"bare"`` (the state dict alone), ``"safetensors"`` (as ``convert-checkpoint`` writes it),
    ``"split"`` (mmengine file holding only ``backbone.reins.*`` + ``decode_head.*``, the way
    training saves it, plus the flat backbone at :func:`split_backbone_path`).
    """
    config = config or tiny_config()
    path = Path(path)
    sd = random_state_dict(config, seed)
    classes = list(classes) if classes is not None else _default_classes(config.num_classes)
    palette = (
        [tuple(c) for c in palette] if palette is not None else _default_palette(config.num_classes)
    )
    meta = {
        "dataset_meta": {"classes": tuple(classes), "palette": [list(c) for c in palette]},
        "cfg": _cfg_text(config),
        "mmengine_version": "0.10.4",
        "seed": 42,
    }
    if fmt == "mmengine":
        torch.save({"meta": meta, "state_dict": sd}, path)
    elif fmt == "bare":
        torch.save(sd, path)
    elif fmt == "split":
        head = {k: v for k, v in sd.items() if k.startswith(("backbone.reins.", "decode_head."))}
        flat = {
            k[len("backbone.") :]: v
            for k, v in sd.items()
            if k.startswith("backbone.") and not k.startswith("backbone.reins.")
        }
        torch.save({"meta": meta, "state_dict": head}, path)
        torch.save(flat, split_backbone_path(path))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        md = {
            "format": "pt",
            "crossearth_format": "1",
            "classes": json.dumps(classes),
            "palette": json.dumps([list(c) for c in palette]),
            "crop_size": str(config.img_size),
            "stride": str(round(config.img_size * 2 / 3)),
            "img_size": str(config.img_size),
            "config": json.dumps(config.to_dict()),
        }
        save_file(sd, str(path), metadata=md)
    else:
        raise ValueError(f"unknown fmt {fmt!r}")
    return path
