"""Read CrossEarth checkpoints safely, infer the architecture, load strictly.

Accepted files (detected by content, not by suffix):

* mmengine training checkpoints: ``{"meta": {...}, "state_dict": {...}, "message_hub": ...}``;
* bare state dicts (``torch.save(model.state_dict())``);
* ``.safetensors`` files, e.g. written by ``crossearth convert-checkpoint`` (their metadata
  carries classes, palette, crop size, ...).

Pickled files are read with ``torch.load(weights_only=True)``: no code from the file runs.
The released checkpoints also carry mmengine's training log (``message_hub``: mmengine
``HistoryBuffer`` objects holding numpy arrays), which ``weights_only`` rejects. Those globals,
and only those (names under ``mmengine.`` / ``numpy.``), are bound to an inert placeholder
class that accepts any arguments and state and does nothing, so the log loads as junk that is
thrown away. Any other global (``builtins.exec``, ``os.system``, ...) means the file wants to
run code: it is refused and nothing from it is executed.

Half-precision or float64 weights are cast to float32 (noted in ``info.warnings``); integer or
boolean tensors where weights belong are an error. Non-finite weights are a warning.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from crossearth_cli.errors import CheckpointError
from crossearth_cli.model.config import CheckpointInfo, CrossEarthConfig, default_out_indices
from crossearth_cli.model.crossearth import CrossEarth
from crossearth_cli.model.files import atomic_write

__all__ = [
    "load_checkpoint",
    "read_checkpoint",
    "read_tensors",
    "infer_config",
    "save_safetensors",
    "convert_checkpoint",
    "SPLIT_HINT",
    "SplitCheckpointError",
]

FULL_MARKER = "backbone.blocks.0.attn.qkv.weight"
SPLIT_HINT = (
    "pass --backbone dinov2_converted.pth (dinov2_converted_1024x1024.pth for 1024×1024 models)"
)
REIN_PARAMS = {
    "scale",
    "learnable_tokens_a",
    "learnable_tokens_b",
    "mlp_token2feat",
    "mlp_delta_f",
    "transform",
    "merge",
}
ENC_HEADS = 8  # not recoverable from shapes (heads × points is); fixed in every Mask2Former
DEC_HEADS = 8
GN_GROUPS = 32
SAFETENSORS_FORMAT = "1"


class SplitCheckpointError(CheckpointError):
    """The file holds only ``backbone.reins.*`` + ``decode_head.*``: pass ``backbone=``.

    A distinct type so a caller that knows the preset can fetch the matching
    ``dinov2_converted*.pth`` (:func:`crossearth_cli.presets.fetch_backbone`) and retry.
    """


# -- reading files -----------------------------------------------------------------------------


class _Inert:
    """Stands in for a training-log class or numpy function; runs nothing, keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _is_inert(name: str) -> bool:
    return name.startswith(("mmengine.", "numpy.")) or name == "_codecs.encode"


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _file_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= path.stat().st_size - 8:
            return "safetensors"
        return "safetensors-truncated"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def _refuse_code(path: Path, names: list[str]) -> CheckpointError:
    shown = ", ".join(sorted(names)[:3])
    return CheckpointError(
        f"refusing to load: the file contains Python code ({shown}) that would run on loading",
        path=path,
        hint="use a checkpoint from a trusted source, or a .safetensors file",
    )


_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _pickle_calls_code(path: Path) -> bool:
    """Whether the file's first pickle references callables (opcodes only: nothing runs)."""
    try:
        with open(path, "rb") as f:
            return any(op.name in _CODE_OPS for op, _, _ in pickletools.genops(f))
    except Exception:  # noqa: BLE001 - malformed stream: not code we can name
        return False


def _torch_load(path: Path, zip_format: bool) -> Any:
    """weights_only load with inert placeholders for the training log (see module doc)."""
    inert: set[str] = set()
    if zip_format:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - unreadable here means unreadable below: report there
            unsafe = []
        code = [g for g in unsafe if not _is_inert(g)]
        if code:
            raise _refuse_code(path, code)
        inert.update(unsafe)
    for _ in range(200):  # each pass may reveal one more global (legacy format, dynamic ones)
        try:
            with (
                torch.serialization.safe_globals([(_Inert, name) for name in sorted(inert)]),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")  # torch's protocol notes are not for users
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zip_format)
        except pickle.UnpicklingError as exc:
            m = _GLOBAL_RE.search(str(exc))
            if m is None and not zip_format and _pickle_calls_code(path):
                raise _refuse_code(path, ["a pickled callable"]) from exc
            if m is None:
                raise CheckpointError(
                    "not a PyTorch checkpoint (its pickle stream is not one torch can read safely)",
                    path=path,
                ) from exc
            name = m.group(1)
            if not _is_inert(name) or name in inert:
                raise _refuse_code(path, [name]) from exc
            inert.add(name)
    raise CheckpointError("refusing to load: too many unknown objects in the file", path=path)


# what each kind of file read by read_tensors is, for its messages' hints
_FILE_KINDS = {
    "checkpoint": ("a CrossEarth .pth or .safetensors file", ", or use --model NAME for a preset"),
    "backbone": ("the DINOv2 backbone, dinov2_converted.pth or dinov2_converted_1024x1024.pth",
                 ""),
    "dinov2": ("Meta's DINOv2 checkpoint, dinov2_vitl14_pretrain.pth", ""),
}


def read_tensors(path: str | Path, kind_of_file: str = "checkpoint",
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read any supported file -> (flat name→tensor dict, extras).

    extras: ``meta`` (mmengine meta dict) and/or ``metadata`` (safetensors string metadata).
    Every failure is a :class:`CheckpointError` naming the file and the fix, which depends on
    ``kind_of_file`` (see :data:`_FILE_KINDS`).
    """
    expected, alternative = _FILE_KINDS[kind_of_file]
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file", path=path, hint=f"check the path{alternative}")
    if path.is_dir():
        raise CheckpointError("is a folder, expected a checkpoint file", path=path)
    if path.stat().st_size == 0:
        raise CheckpointError("is empty", path=path, hint="download the checkpoint again")
    kind = _file_kind(path)
    truncated = CheckpointError(
        "is truncated or corrupted (cannot read it as a checkpoint)",
        path=path,
        hint="download the checkpoint again",
    )
    if kind == "safetensors-truncated":
        raise truncated
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise truncated from exc
        return tensors, {"metadata": metadata}
    if kind == "unknown":
        raise CheckpointError(
            "not a checkpoint (neither a PyTorch .pth nor a .safetensors file)",
            path=path,
            hint=f"pass {expected}",
        )
    zip_format = kind == "torch-zip"
    try:
        is_zip = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError):  # a mangled end-of-archive record
        is_zip = False
    if zip_format and not is_zip:
        raise truncated
    try:
        obj = _torch_load(path, zip_format)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways (struct
        # errors, TypeErrors from mangled calls, assertions in torch): all mean "corrupt";
        # weights_only=True guarantees that none of it ran code from the file
        raise truncated from exc
    return _extract(obj, path)


def _extract(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"not a checkpoint: it holds a {type(obj).__name__}, not a dict of weights",
            path=path,
        )
    extras: dict[str, Any] = {}
    sd: Any = obj
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        if isinstance(obj.get("meta"), dict):
            extras["meta"] = obj["meta"]
    elif isinstance(obj.get("model"), dict):
        sd = obj["model"]
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            "not a checkpoint: no weight tensors found", path=path, hint="pass a .pth state dict"
        )
    return tensors, extras


# -- metadata ---------------------------------------------------------------------------------


def _parse_cfg_text(cfg: str) -> dict[str, int]:
    """crop size / stride / img size from mmengine's config text (``meta['cfg']``)."""
    out: dict[str, int] = {}
    scope = ""  # the model's slide test_cfg, not the runner's test_cfg=dict(type='TestLoop')
    for m in re.finditer(r"test_cfg", cfg):
        window = cfg[m.start() : m.start() + 400]
        if "crop_size" in window:
            scope = window
            break
    for key in ("crop_size", "stride"):
        m = re.search(key + r"\s*=\s*\(\s*(\d+)\s*,\s*(\d+)", scope)
        if m:
            out[key] = int(m.group(1))
    m = re.search(r"img_size\s*=\s*(\d+)", cfg)
    if m:
        out["img_size"] = int(m.group(1))
    return out


def _as_classes(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value):
        return list(value)
    return None


def _as_palette(value: Any) -> list[tuple[int, int, int]] | None:
    try:
        pal = [tuple(int(v) for v in c) for c in value]
    except (TypeError, ValueError):
        return None
    if pal and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in pal):
        return pal  # type: ignore[return-value]
    return None


def _info_from_extras(path: Path, extras: dict[str, Any]) -> tuple[CheckpointInfo, dict]:
    info = CheckpointInfo(source=str(path))
    hints: dict[str, Any] = {}
    meta = extras.get("meta")
    if isinstance(meta, dict):
        dm = meta.get("dataset_meta")
        if isinstance(dm, dict):
            info.classes = _as_classes(dm.get("classes"))
            info.palette = _as_palette(dm.get("palette")) if dm.get("palette") else None
        if isinstance(meta.get("cfg"), str):
            parsed = _parse_cfg_text(meta["cfg"])
            info.crop_size = parsed.get("crop_size")
            info.stride = parsed.get("stride")
            hints["img_size"] = parsed.get("img_size")
    md = extras.get("metadata")
    if isinstance(md, dict):

        def js(key: str) -> Any:
            try:
                return json.loads(md[key]) if key in md else None
            except (TypeError, ValueError):
                info.warnings.append(f"ignored unreadable '{key}' in the file's metadata")
                return None

        def num(key: str) -> int | None:
            try:
                return int(md[key]) if md.get(key) not in (None, "", "null") else None
            except ValueError:
                info.warnings.append(f"ignored unreadable '{key}' in the file's metadata")
                return None

        info.classes = _as_classes(js("classes")) or info.classes
        info.palette = _as_palette(js("palette") or []) or info.palette
        info.crop_size = num("crop_size") or info.crop_size
        info.stride = num("stride") or info.stride
        if md.get("bands") in ("RGB", "IRRG"):
            info.bands = md["bands"]
        if md.get("preset"):
            info.preset = md["preset"]
        hints["img_size"] = num("img_size")
    return info, hints


# -- state-dict surgery -------------------------------------------------------------------------


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _is_kept(key: str) -> bool:
    if key.startswith("backbone.reins."):
        return key.split(".")[2] in REIN_PARAMS
    return key.startswith(("backbone.", "decode_head."))


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:3] if key.startswith("backbone.reins.") else parts[:1])


def _drop_extras(sd: dict[str, torch.Tensor], info: CheckpointInfo) -> dict[str, torch.Tensor]:
    dropped = [k for k in sd if not _is_kept(k)]
    if dropped:
        info.dropped_keys = dropped
        groups = Counter(_group(k) for k in dropped)
        listing = ", ".join(f"{g}.* ({n})" for g, n in groups.most_common())
        info.warnings.append(
            f"dropped {len(dropped)} training-only tensors not used at inference: {listing}"
        )
    gone = set(dropped)
    return {k: v for k, v in sd.items() if k not in gone}


def _holds_a_backbone(sd: dict[str, torch.Tensor]) -> bool:
    """Any DINOv2 tensor other than the Rein adapter's: a full checkpoint, maybe damaged."""
    return FULL_MARKER in sd or any(
        k.startswith(("backbone.blocks.", "backbone.patch_embed.", "backbone.pos_embed"))
        for k in sd
    )


def _complete_backbone(
    sd: dict[str, torch.Tensor],
    path: Path,
    backbone: str | Path | None,
    info: CheckpointInfo,
    expected_img: int | None,
) -> dict[str, torch.Tensor]:
    if _holds_a_backbone(sd):  # a missing tensor of it is then reported as missing
        if backbone is not None:
            info.warnings.append(
                f"{path.name} already holds the backbone; --backbone {Path(backbone).name} "
                "was not used"
            )
        return sd
    if backbone is None:
        raise SplitCheckpointError(
            "holds only the Rein adapter and decode head, not the DINOv2 backbone weights",
            path=path,
            hint=SPLIT_HINT,
        )
    bpath = Path(backbone)
    bsd, _ = read_tensors(bpath, "backbone")
    bsd = _strip_module(bsd)
    if any(k.startswith("backbone.") for k in bsd):
        bsd = {k[9:]: v for k, v in bsd.items() if k.startswith("backbone.")}
    bsd = {k: v for k, v in bsd.items() if not k.startswith("reins.")}
    if "pos_embed" not in bsd or "patch_embed.proj.weight" not in bsd:
        raise CheckpointError(
            "not a DINOv2 backbone file (no pos_embed / patch_embed.proj.weight)",
            path=bpath,
            hint=SPLIT_HINT,
        )
    kernel = tuple(bsd["patch_embed.proj.weight"].shape[-2:])
    if kernel != (16, 16):
        raise CheckpointError(
            f"is an unconverted DINOv2 backbone (patch {kernel[0]}×{kernel[1]}, CrossEarth uses "
            "16×16)",
            path=bpath,
            hint="convert it first: crossearth convert-dinov2 IN dinov2_converted.pth",
        )
    n = bsd["pos_embed"].shape[1] - 1
    g = int(round(n**0.5))
    if g * g != n:
        raise CheckpointError(
            f"pos_embed has {n} patch positions, not a square grid", path=bpath, hint=SPLIT_HINT
        )
    if expected_img is not None and g * 16 != expected_img:
        right = "dinov2_converted_1024x1024.pth" if expected_img == 1024 else "dinov2_converted.pth"
        raise CheckpointError(
            f"backbone pos_embed is for {g * 16}×{g * 16} inputs ({n + 1} tokens) but "
            f"{path.name} was trained at {expected_img}×{expected_img}",
            path=bpath,
            hint=f"pass --backbone {right}",
        )
    merged = dict(sd)
    for k, v in bsd.items():
        merged.setdefault("backbone." + k, v)
    return merged


# -- architecture ---------------------------------------------------------------------------


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.fullmatch(k))}
    return (max(idx) + 1) if idx else 0


def infer_config(sd: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> CrossEarthConfig:
    """Architecture from tensor shapes and key counts (works on meta tensors too).

    embed dim ← pos_embed, patch ← patch kernel, grid/img size ← pos_embed length, depth ←
    block count, heads = embed/64, MLP width ← fc1, Rein tokens/rank ← learnable_tokens_a,
    classes ← cls_embed, head widths ← input_convs / mask_embed / FFN shapes, encoder and
    decoder depth ← layer counts, deformable points ← attention_weights rows / (levels × 8).
    Out indices follow :func:`default_out_indices` ((7, 11, 15, 23) for depth 24).
    """
    need = [
        "backbone.pos_embed",
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.mlp.fc1.weight",
        "backbone.reins.learnable_tokens_a",
        "decode_head.cls_embed.weight",
        "decode_head.mask_embed.4.weight",
        "decode_head.pixel_decoder.input_convs.0.conv.weight",
        "decode_head.pixel_decoder.level_encoding.weight",
        "decode_head.pixel_decoder.encoder.layers.0.ffn.layers.0.0.weight",
        "decode_head.pixel_decoder.encoder.layers.0.self_attn.attention_weights.weight",
        "decode_head.transformer_decoder.layers.0.ffn.layers.0.0.weight",
    ]
    missing = [k for k in need if k not in sd]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"does not match the CrossEarth architecture: missing {', '.join(missing[:3])}{more}",
            path=path,
            hint="pass an official CrossEarth checkpoint",
        )

    def shape(k: str) -> tuple[int, ...]:
        return tuple(sd[k].shape)

    pos = shape("backbone.pos_embed")
    embed = pos[-1]
    patch = shape("backbone.patch_embed.proj.weight")[-1]
    n = pos[1] - 1
    grid = int(round(n**0.5))
    depth = _count(sd, r"backbone\.blocks\.(\d+)\.norm1\.weight")
    layers, tokens, rank = shape("backbone.reins.learnable_tokens_a")
    levels, feat = shape("decode_head.pixel_decoder.level_encoding.weight")
    aw_rows = shape(
        "decode_head.pixel_decoder.encoder.layers.0.self_attn.attention_weights.weight"
    )[0]
    problems = []
    if grid * grid != n:
        problems.append(f"backbone.pos_embed has {n} positions, not a square grid")
    if patch != 16:
        problems.append(f"patch kernel is {patch}, expected 16 (converted DINOv2)")
    if layers != depth:
        problems.append(f"Rein tokens cover {layers} layers but the ViT has {depth} blocks")
    if aw_rows % (levels * ENC_HEADS):
        problems.append(f"attention_weights has {aw_rows} rows, not levels × {ENC_HEADS} × points")
    if problems:
        raise CheckpointError(
            "does not match the CrossEarth architecture: " + "; ".join(problems), path=path
        )
    try:
        return CrossEarthConfig(
            num_classes=shape("decode_head.cls_embed.weight")[0] - 1,
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=embed,
            depth=depth,
            num_heads=max(1, embed // 64),
            mlp_dim=shape("backbone.blocks.0.mlp.fc1.weight")[0],
            out_indices=default_out_indices(depth),
            token_length=tokens,
            lora_dim=rank,
            feat_channels=feat,
            mask_channels=shape("decode_head.mask_embed.4.weight")[0],
            num_queries=tokens,
            enc_layers=_count(
                sd, r"decode_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.weight"
            ),
            enc_heads=ENC_HEADS,
            enc_points=aw_rows // (levels * ENC_HEADS),
            enc_ffn_dim=shape("decode_head.pixel_decoder.encoder.layers.0.ffn.layers.0.0.weight")[
                0
            ],
            dec_layers=_count(
                sd, r"decode_head\.transformer_decoder\.layers\.(\d+)\.norms\.0\.weight"
            ),
            dec_heads=DEC_HEADS,
            dec_ffn_dim=shape("decode_head.transformer_decoder.layers.0.ffn.layers.0.0.weight")[0],
            num_levels=levels,
            gn_groups=GN_GROUPS,
        )
    except ValueError as exc:
        raise CheckpointError(
            f"does not match the CrossEarth architecture: {exc}", path=path
        ) from exc


def _fmt_shape(s: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in s) or "scalar"


def _check_keys(
    expected: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor], path: Path
) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return

    def names(keys: list[str], fmt=lambda k: k) -> str:
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        return ", ".join(fmt(k) for k in keys[:3]) + more

    parts = []
    if missing:
        parts.append(f"missing {names(missing)}")
    if unexpected:
        parts.append(f"unexpected {names(unexpected)}")
    if wrong:
        parts.append(
            "wrong shape "
            + names(
                wrong,
                lambda k: (
                    f"{k} (file {_fmt_shape(tuple(sd[k].shape))}, model {_fmt_shape(expected[k])})"
                ),
            )
        )
    raise CheckpointError(
        "does not match the CrossEarth architecture: " + "; ".join(parts),
        path=path,
        hint="pass an official CrossEarth checkpoint",
    )


def _check_values(
    sd: dict[str, torch.Tensor], path: Path, info: CheckpointInfo
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    cast: Counter[str] = Counter()
    nonfinite: list[str] = []
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(
                f"tensor {k} has dtype {str(v.dtype).replace('torch.', '')}, expected "
                "floating-point weights",
                path=path,
                hint="the file is damaged or not a CrossEarth checkpoint",
            )
        if v.dtype != torch.float32:
            cast[str(v.dtype).replace("torch.", "")] += 1
        v = v.to(torch.float32).contiguous().clone()  # also detaches from a memory-mapped file
        if not bool(torch.isfinite(v).all()):
            nonfinite.append(k)
        out[k] = v
    if cast:
        kinds = ", ".join(sorted(cast))
        info.warnings.append(f"weights stored as {kinds} were converted to float32")
    if nonfinite:
        info.warnings.append(
            f"{len(nonfinite)} weight tensors hold NaN or Inf values (first: {nonfinite[0]}); "
            "the model's output will be unusable"
        )
    return out


def _preset_img(path: Path) -> int | None:
    """The input size of the preset whose released file ``path`` is named like, if any."""
    from crossearth_cli.presets import find_preset_for_file

    preset = find_preset_for_file(path.name)
    return preset.crop_size if preset else None


def _apply_preset(path: Path, info: CheckpointInfo, config: CrossEarthConfig) -> None:
    from crossearth_cli.presets import find_preset_for_file

    preset = find_preset_for_file(path.name)
    if preset is None or len(preset.classes) != config.num_classes:
        return
    info.preset = info.preset or preset.name
    if info.classes is None:
        info.classes = list(preset.classes)
        info.palette = info.palette or list(preset.palette)
    info.bands = info.bands or preset.bands
    if info.crop_size is None and preset.crop_size != config.img_size:
        # named like the preset's file, but trained at another size: tile at the model's
        info.warnings.append(
            f"{path.name} is named like preset {preset.name}'s file ({preset.crop_size}×"
            f"{preset.crop_size} inputs) but its model takes {config.img_size}×"
            f"{config.img_size}; tiles of {config.img_size} used"
        )
        return
    info.crop_size = info.crop_size or preset.crop_size
    info.stride = info.stride or preset.stride


def read_checkpoint(
    path: str | Path, backbone: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], CrossEarthConfig, CheckpointInfo]:
    """Read, clean and validate a checkpoint without building the model.

    Returns (state dict with exactly the model's keys, float32; inferred config; info).
    """
    path = Path(path)
    raw, extras = read_tensors(path)
    info, hints = _info_from_extras(path, extras)
    raw = _strip_module(raw)
    if not any(k.startswith(("backbone.reins.", "decode_head.")) for k in raw):
        sample = ", ".join(list(raw)[:3])
        raise CheckpointError(
            f"not a CrossEarth checkpoint: no backbone.reins.* or decode_head.* tensors "
            f"(its keys look like: {sample})",
            path=path,
            hint="pass a CrossEarth checkpoint; a DINOv2 file goes to --backbone",
        )
    sd = _drop_extras(raw, info)
    sd = _complete_backbone(sd, path, backbone, info, hints.get("img_size") or _preset_img(path))
    try:
        config = infer_config(sd, path)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in CrossEarth(config).state_dict().items()}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - tensors of impossible shapes (a damaged file)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"does not match the CrossEarth architecture (its tensor shapes are inconsistent: "
            f"{first[:120]})",
            path=path,
            hint="the file is damaged or not a CrossEarth checkpoint; download it again",
        ) from exc
    _check_keys(expected, sd, path)
    sd = _check_values(sd, path, info)
    if info.classes is not None and len(info.classes) != config.num_classes:
        info.warnings.append(
            f"the file names {len(info.classes)} classes but the model has {config.num_classes}; "
            "class names ignored"
        )
        info.classes = None
    if info.palette is not None and len(info.palette) != config.num_classes:
        info.palette = None
    _apply_preset(path, info, config)
    return sd, config, info


def load_checkpoint(
    path: str | Path, backbone: str | Path | None = None, device: str | torch.device = "cpu"
) -> CrossEarth:
    """Load a CrossEarth checkpoint -> :class:`CrossEarth` in eval mode on ``device``.

    ``backbone``: a flat ``dinov2_converted*.pth`` completing a checkpoint that holds only
    ``backbone.reins.*`` + ``decode_head.*`` (ignored, with a warning, for full checkpoints).
    Raises :class:`CheckpointError` with one line naming the file and the fix.
    """
    sd, config, info = read_checkpoint(path, backbone)
    with torch.device("meta"):
        model = CrossEarth(config, info)
    model.load_state_dict(sd, strict=True, assign=True)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:  # no CUDA, bad device name
        from crossearth_cli.errors import ConfigError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot use device '{device}': {first}") from exc
    return model.eval()


# -- writing ------------------------------------------------------------------------------------


def _metadata(model: CrossEarth) -> dict[str, str]:
    info, config = model.info, model.config
    md = {
        "format": "pt",
        "crossearth_format": SAFETENSORS_FORMAT,
        "config": json.dumps(config.to_dict()),
        "img_size": str(config.img_size),
        "num_classes": str(config.num_classes),
        "crop_size": str(info.crop_size or config.img_size),
        "source": Path(info.source).name if info.source else "",
    }
    if info.classes is not None:
        md["classes"] = json.dumps(info.classes)
    if info.palette is not None:
        md["palette"] = json.dumps([list(c) for c in info.palette])
    if info.stride is not None:
        md["stride"] = str(info.stride)
    if info.bands is not None:
        md["bands"] = info.bands
    if info.preset is not None:
        md["preset"] = info.preset
    return md


def save_safetensors(model: CrossEarth, dst: str | Path, overwrite: bool = False) -> Path:
    """Write the full weights (backbone included) and the checkpoint facts, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    md = _metadata(model)
    return atomic_write(dst, lambda tmp: save_file(tensors, str(tmp), metadata=md), overwrite)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    backbone: str | Path | None = None,
    overwrite: bool = False,
) -> CrossEarth:
    """Validate ``src`` fully (as :func:`load_checkpoint`) and write it as one safetensors file."""
    from crossearth_cli.model.files import check_destination

    dst = check_destination(dst, overwrite)  # fail before the slow read
    model = load_checkpoint(src, backbone=backbone)
    save_safetensors(model, dst, overwrite=overwrite)
    return model
