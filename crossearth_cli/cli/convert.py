"""`crossearth convert-checkpoint` and `crossearth convert-dinov2`."""

from __future__ import annotations

from pathlib import Path

import typer

from crossearth_cli.cli.app import app


def _warn(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"crossearth: warning: {line}", err=True)


@app.command("convert-checkpoint")
def convert_checkpoint_cmd(
    src: Path = typer.Argument(..., help="CrossEarth checkpoint (.pth or .safetensors)."),
    dst: Path = typer.Argument(..., help="Output file, ending in .safetensors."),
    backbone: Path | None = typer.Option(
        None,
        "--backbone",
        help="dinov2_converted*.pth, for checkpoints that hold only the Rein adapter and head.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    """Write one safe, fast-loading .safetensors file (full weights + classes, palette, sizes).

    The checkpoint is checked completely first (architecture, every key and shape); training
    extras are dropped. The output is written under a temporary name and renamed at the end.
    """
    from crossearth_cli.errors import ConfigError

    if dst.suffix.lower() != ".safetensors":
        raise ConfigError(
            "the output must be a .safetensors file",
            path=dst,
            hint="name it e.g. model.safetensors",
        )
    from crossearth_cli.model.checkpoint import convert_checkpoint

    model = convert_checkpoint(src, dst, backbone=backbone, overwrite=overwrite)
    _warn(model.info.warnings)
    info, cfg = model.info, model.config
    classes = ", ".join(info.classes) if info.classes else "names unknown"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    typer.echo(
        f"wrote {dst}: {cfg.num_classes} classes ({classes}), image size {cfg.img_size}, "
        f"{params:.2f} M parameters"
    )


@app.command("convert-dinov2")
def convert_dinov2_cmd(
    src: Path = typer.Argument(..., help="Meta's dinov2_vitl14_pretrain.pth."),
    dst: Path = typer.Argument(..., help="Output, e.g. dinov2_converted.pth."),
    size: int = typer.Option(512, "--size", help="Model input size: 512 or 1024."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    """Make dinov2_converted*.pth from Meta's DINOv2 (patch 14→16, positions 37²→32² or 64²).

    Prefer the released dinov2_converted*.pth when you have it: bicubic resizing can differ in
    the last bit between PyTorch versions.
    """
    from crossearth_cli.errors import ConfigError

    if size not in (512, 1024):
        raise ConfigError(f"--size must be 512 or 1024, got {size}")
    from crossearth_cli.model.dinov2_convert import convert_dinov2_file

    out = convert_dinov2_file(src, dst, img_size=size, overwrite=overwrite)
    typer.echo(f"wrote {out} (patch 16, {size // 16}×{size // 16} positions)")
