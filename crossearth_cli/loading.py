"""From ``--model`` / ``--checkpoint`` to a :class:`~crossearth_cli.engine.ModelSpec`.

Class names come from the checkpoint when it carries them, then from the preset, then
``class_<i>``. Crop, stride and band order come from the preset (or the checkpoint's metadata);
a checkpoint that says nothing of them is tiled at its model's input size with 2/3 strides.
"""

from __future__ import annotations

from pathlib import Path

from crossearth_cli.errors import ConfigError, UserError

DEFAULT_MODEL = "potsdam-rgb"


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    base = [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    ]
    return [base[i % len(base)] for i in range(n)]


def resolve_model(
    model: str | None = None,
    checkpoint: Path | None = None,
    backbone: Path | None = None,
    device: str = "cpu",
    allow_random: bool = False,
    notes: list[str] | None = None,
):
    """Load the model the user asked for and describe it for the engine.

    ``allow_random``: when the preset's weights are neither cached nor downloadable, build a
    small random-weight model of the same architecture (for demos and smoke tests only).
    """
    from crossearth_cli.engine import ModelSpec
    from crossearth_cli.presets import fetch_weights, get_preset

    notes = notes if notes is not None else []
    if model and checkpoint:
        raise ConfigError("give --model or --checkpoint, not both")
    preset = get_preset(model or DEFAULT_MODEL) if (model or not checkpoint) else None
    random_weights = False
    if checkpoint is None:
        try:
            checkpoint = fetch_weights(preset)
        except UserError:
            if not allow_random:
                raise
            random_weights = True
    if random_weights:
        module = _random_model(preset)
        info = None
        label = f"{preset.name} (RANDOM WEIGHTS)"
    else:
        module = _load(checkpoint, backbone, preset, device)
        info = module.info
        notes.extend(info.warnings)
        label = preset.name if preset else Path(checkpoint).name
    n = module.num_classes
    if preset is not None and not random_weights and n != len(preset.classes):
        # the file's own class names must not hide that it is not the preset's model
        raise ConfigError(
            f"the checkpoint {Path(checkpoint).name} has {n} classes but preset {preset.name} "
            f"has {len(preset.classes)} ({', '.join(preset.classes)})",
            hint="use the preset that matches the file, or pass it alone with --checkpoint",
        )
    names = (info.classes if info and info.classes else None) or (
        list(preset.classes) if preset else None
    )
    if names is not None and len(names) != n:
        if info and info.classes:
            raise ConfigError(f"the checkpoint names {len(names)} classes but has {n} outputs")
        raise ConfigError(
            f"preset {preset.name} has {len(names)} classes but the checkpoint has {n}",
            hint="use --checkpoint alone, or the preset that matches it",
        )
    names = names or [f"class_{i}" for i in range(n)]
    palette = (info.palette if info and info.palette else None) or (
        list(preset.palette) if preset and preset.palette else None
    )
    crop = (info.crop_size if info and info.crop_size else None) or (
        preset.crop_size if preset else module.config.img_size
    )
    stride = (info.stride if info and info.stride else None) or (
        preset.stride if preset else round(crop * 2 / 3)
    )
    bands = (info.bands if info and info.bands else None) or (preset.bands if preset else "RGB")
    known = preset or (get_preset(info.preset) if info and info.preset else None)
    return ModelSpec(
        module=module,
        class_names=list(names),
        palette=[tuple(c) for c in palette] if palette else _default_palette(n),
        crop=int(crop),
        stride=int(stride),
        band_order=bands,
        label=label,
        random_weights=random_weights,
        preset=known.name if known else None,
        gsd_m=known.gsd_m if known else None,
    )


def _load(checkpoint: Path, backbone: Path | None, preset, device: str):
    """Load a checkpoint; a released Rein+head-only file gets its backbone from the hub."""
    from crossearth_cli.model import load_checkpoint
    from crossearth_cli.model.checkpoint import SplitCheckpointError
    from crossearth_cli.presets import fetch_backbone

    try:
        return load_checkpoint(checkpoint, backbone=backbone, device=device)
    except SplitCheckpointError:
        if backbone is not None or preset is None:
            raise
        return load_checkpoint(checkpoint, backbone=fetch_backbone(preset), device=device)


def _random_model(preset):
    from crossearth_cli.model import build_model
    from crossearth_cli.model.random_init import random_state_dict, tiny_config

    config = tiny_config(num_classes=len(preset.classes))
    module = build_model(config)
    module.load_state_dict(random_state_dict(config, seed=0))
    return module.eval()
