"""Meta's ``dinov2_vitl14_pretrain.pth`` -> ``dinov2_converted*.pth`` (reference §4).

Only two tensors change: the 37×37 patch positions are resized bicubically (``size=``, not a
scale factor) to 32×32 (512 models) or 64×64 (1024 models), and the 14×14 patch kernel is
resized bicubically to 16×16 without rescaling its magnitude. Everything else is copied. The
released ``dinov2_converted*.pth`` files remain the safer choice: bicubic weights can differ
in the last bit between torch versions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from crossearth_cli.errors import CheckpointError, ConfigError
from crossearth_cli.model.files import atomic_write

__all__ = ["convert_dinov2", "convert_dinov2_file"]


def convert_dinov2(
    sd: dict[str, torch.Tensor], img_size: int = 512, patch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Return a new flat dict with pos_embed and the patch kernel converted."""
    if img_size % patch_size:
        raise ConfigError(f"--size {img_size} is not a multiple of the patch size {patch_size}")
    out = dict(sd)
    pos = sd["pos_embed"].float()  # 1×(1+G²)×C
    n = pos.shape[1] - 1
    g = int(round(n**0.5))
    grid = img_size // patch_size
    c = pos.shape[-1]
    patch_pos = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, c)
    out["pos_embed"] = torch.cat([pos[:, :1], patch_pos], dim=1).to(sd["pos_embed"].dtype)
    w = sd["patch_embed.proj.weight"].float()
    out["patch_embed.proj.weight"] = F.interpolate(
        w, size=(patch_size, patch_size), mode="bicubic", align_corners=False
    )
    return out


def convert_dinov2_file(
    src: str | Path, dst: str | Path, img_size: int = 512, overwrite: bool = False
) -> Path:
    """Read a DINOv2 ViT checkpoint, convert it, write ``dst`` (.pth, or .safetensors by suffix)."""
    from crossearth_cli.model.checkpoint import read_tensors
    from crossearth_cli.model.files import check_destination

    src, dst = Path(src), check_destination(dst, overwrite)  # before the slow read
    sd, _ = read_tensors(src, "dinov2")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        if key not in sd:
            raise CheckpointError(
                f"not a DINOv2 ViT checkpoint (no '{key}')",
                path=src,
                hint="pass Meta's dinov2_vitl14_pretrain.pth",
            )
    if "register_tokens" in sd:
        raise CheckpointError(
            "is a DINOv2 'with registers' model; CrossEarth uses the plain one",
            path=src,
            hint="pass dinov2_vitl14_pretrain.pth",
        )
    kernel = tuple(sd["patch_embed.proj.weight"].shape[-2:])
    n = sd["pos_embed"].shape[1] - 1
    if int(round(n**0.5)) ** 2 != n:
        raise CheckpointError(f"pos_embed has {n} positions, not a square grid", path=src)
    if kernel == (16, 16):
        raise CheckpointError(
            "is already converted (patch 16×16)", path=src, hint="use it directly as --backbone"
        )
    out = convert_dinov2(sd, img_size=img_size)
    out = {k: v.contiguous() for k, v in out.items()}

    def write(tmp: Path) -> None:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(out, str(tmp), metadata={"format": "pt", "img_size": str(img_size)})
        else:
            torch.save(out, tmp)

    return atomic_write(dst, write, overwrite=overwrite)
