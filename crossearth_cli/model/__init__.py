"""CrossEarth in plain PyTorch: DINOv2 ViT + Rein adapter + Mask2Former (no mm* packages).

Layout (one module per component, as segment-anything's ``modeling/``):
``config`` (hyper-parameters, checkpoint facts), ``attention`` (SDPA / xformers dispatch),
``backbone`` (ViT + pos-embed interpolation), ``reins``, ``ms_deform_attn``, ``positional``,
``msda_triton`` (its fused CUDA kernel), ``pixel_decoder``, ``transformer_decoder``, ``head``
(Mask2Former + semantic scores),
``crossearth`` (the whole model), ``checkpoint`` (safe reading, inference of the architecture,
strict loading, safetensors export), ``precision`` (weights stored in the autocast dtype),
``dinov2_convert``, ``random_init`` (test models).
"""

from crossearth_cli.model.checkpoint import (
    convert_checkpoint,
    infer_config,
    load_checkpoint,
    read_checkpoint,
    save_safetensors,
)
from crossearth_cli.model.config import CheckpointInfo, CrossEarthConfig, default_out_indices
from crossearth_cli.model.crossearth import CrossEarth, build_model

__all__ = [
    "CheckpointInfo",
    "CrossEarth",
    "CrossEarthConfig",
    "build_model",
    "convert_checkpoint",
    "default_out_indices",
    "infer_config",
    "load_checkpoint",
    "read_checkpoint",
    "save_safetensors",
]
