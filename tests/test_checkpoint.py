"""Checkpoints in every released layout load to the same model; bad ones fail clearly."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossearth_cli.errors import CheckpointError, OutputError
from crossearth_cli.model import CrossEarth, convert_checkpoint, load_checkpoint
from crossearth_cli.model.dinov2_convert import convert_dinov2_file
from crossearth_cli.model.random_init import (
    ISPRS_CLASSES,
    random_state_dict,
    split_backbone_path,
    tiny_config,
    write_random_checkpoint,
)

CONFIG = tiny_config(num_classes=6, img_size=128)


@pytest.fixture(scope="module")
def reference():
    model = CrossEarth(CONFIG).eval()
    model.load_state_dict(random_state_dict(CONFIG, seed=0))
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
    return x, y


def run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("fmt", ["mmengine", "bare", "safetensors", "split"])
def test_round_trip_gives_identical_outputs(tmp_path, reference, fmt):
    x, y = reference
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pth")
    write_random_checkpoint(path, CONFIG, seed=0, fmt=fmt)
    backbone = split_backbone_path(path) if fmt == "split" else None
    model = load_checkpoint(path, backbone=backbone)
    assert not model.training
    assert model.config == CONFIG and model.num_classes == 6
    assert torch.equal(run(model, x), y)
    assert model.info.warnings == [] and model.info.dropped_keys == []
    if fmt != "bare":
        assert model.info.classes == ISPRS_CLASSES
        assert model.info.crop_size == 128 and model.info.stride == 85
        assert len(model.info.palette) == 6


def test_split_file_really_lacks_the_backbone(tmp_path):
    path = write_random_checkpoint(tmp_path / "split.pth", CONFIG, fmt="split")
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert "backbone.blocks.0.attn.qkv.weight" not in sd
    assert all(k.startswith(("backbone.reins.", "decode_head.")) for k in sd)
    flat = torch.load(split_backbone_path(path), weights_only=True)
    assert "pos_embed" in flat and not any(k.startswith(("backbone.", "reins.")) for k in flat)


def test_convert_checkpoint_writes_safetensors_with_metadata(tmp_path, reference):
    x, y = reference
    src = write_random_checkpoint(tmp_path / "split.pth", CONFIG, fmt="split")
    dst = tmp_path / "model.safetensors"
    convert_checkpoint(src, dst, backbone=split_backbone_path(src))
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        md = f.metadata()
        assert "backbone.blocks.0.attn.qkv.weight" in set(f.keys())  # full weights
    assert json.loads(md["classes"]) == ISPRS_CLASSES
    assert json.loads(md["palette"])[1] == [0, 0, 255]
    assert md["crop_size"] == "128" and md["img_size"] == "128" and md["stride"] == "85"
    model = load_checkpoint(dst)
    assert model.info.classes == ISPRS_CLASSES and model.info.crop_size == 128
    assert torch.equal(run(model, x), y)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    with pytest.raises(OutputError, match="already exists"):
        convert_checkpoint(src, dst, backbone=split_backbone_path(src))
    convert_checkpoint(dst, dst, overwrite=True)  # safetensors -> safetensors, in place


def fake_training_checkpoint(path: Path, legacy: bool = False) -> None:
    """What a released file holds: module. prefixes, training-only modules (also inside the
    Rein adapter), and mmengine's training log of HistoryBuffer objects with numpy arrays."""
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.arange(3.0)
            self._count_history = np.ones(3, dtype=np.int64)

    HistoryBuffer.__module__ = mod.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    try:
        for n in names:
            sys.modules[n] = mod if n == mod.__name__ else types.ModuleType(n)
        sd = {"module." + k: v for k, v in random_state_dict(CONFIG, seed=0).items()}
        sd["module.task_head.fc.weight"] = torch.zeros(4, 4)
        sd["module.aspp_head.conv.weight"] = torch.zeros(2, 2)
        sd["module.augmentor.style.weight"] = torch.zeros(2)
        sd["module.backbone.reins.image_convs.0.weight"] = torch.zeros(2, 3, 3, 3)
        ckpt = {
            "meta": {"dataset_meta": {"classes": tuple("abcdef")}, "cfg": "crop_size = (128,)"},
            "state_dict": sd,
            "message_hub": {
                "log_scalars": {"train/loss": HistoryBuffer()},
                "runtime_info": {"iter": np.int64(30000), "lr": np.float32(1e-4)},
            },
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1}]},
        }
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.mark.parametrize("legacy", [False, True])
def test_training_log_and_extras_are_dropped_with_a_warning(tmp_path, reference, legacy):
    x, y = reference
    path = tmp_path / "Potsdam-like.pth"
    fake_training_checkpoint(path, legacy=legacy)
    assert "mmengine" not in sys.modules  # nothing of the log's classes is importable
    model = load_checkpoint(path)
    assert torch.equal(run(model, x), y)
    assert model.info.classes == list("abcdef")
    assert sorted(model.info.dropped_keys) == [
        "aspp_head.conv.weight",
        "augmentor.style.weight",
        "backbone.reins.image_convs.0.weight",
        "task_head.fc.weight",
    ]
    (warning,) = model.info.warnings
    assert "dropped 4 training-only tensors" in warning and "task_head" in warning


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    sd = random_state_dict(CONFIG)
    torch.save(
        {"state_dict": sd, "meta": {"x": Payload(marker)}},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match="refusing to load: the file contains Python code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_half_precision_is_cast_and_nan_is_a_warning(tmp_path):
    sd = random_state_dict(CONFIG)
    sd = {k: v.half() for k, v in sd.items()}
    sd["decode_head.cls_embed.bias"][0] = float("nan")
    torch.save({"state_dict": sd}, tmp_path / "half.pth")
    model = load_checkpoint(tmp_path / "half.pth")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    text = " ".join(model.info.warnings)
    assert "float16 were converted to float32" in text
    assert "NaN or Inf" in text and "decode_head.cls_embed.bias" in text


def test_integer_weights_are_an_error(tmp_path):
    sd = random_state_dict(CONFIG)
    sd["backbone.norm.weight"] = sd["backbone.norm.weight"].long()
    torch.save(sd, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="backbone.norm.weight has dtype int64"):
        load_checkpoint(tmp_path / "int.pth")


def test_wrong_architecture_names_the_first_mismatching_keys(tmp_path):
    sd = random_state_dict(CONFIG)
    sd["decode_head.query_feat.weight"] = sd.pop("decode_head.querys2feat.weight")
    sd["decode_head.cls_embed.bias"] = torch.zeros(9)
    torch.save(sd, tmp_path / "m2f.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "m2f.pth")
    msg = exc.value.one_line()
    assert "does not match the CrossEarth architecture" in msg
    assert "missing decode_head.querys2feat.weight" in msg
    assert "unexpected decode_head.query_feat.weight" in msg
    assert "decode_head.cls_embed.bias (file 9, model 7)" in msg


def test_not_crossearth_at_all(tmp_path):
    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a CrossEarth checkpoint.*conv1.weight"):
        load_checkpoint(tmp_path / "resnet.pth")


def test_split_without_backbone_says_what_to_pass(tmp_path):
    path = write_random_checkpoint(tmp_path / "split.pth", CONFIG, fmt="split")
    from crossearth_cli.model.checkpoint import SplitCheckpointError

    with pytest.raises(SplitCheckpointError) as exc:
        load_checkpoint(path)
    assert "not the DINOv2 backbone" in exc.value.one_line()
    assert "--backbone dinov2_converted.pth" in exc.value.one_line()


def test_split_with_backbone_for_the_wrong_image_size(tmp_path):
    path = write_random_checkpoint(tmp_path / "split.pth", CONFIG, fmt="split")
    wrong = write_random_checkpoint(tmp_path / "other.pth", tiny_config(img_size=256), fmt="split")
    with pytest.raises(CheckpointError, match="for 256×256 inputs.*trained at 128×128"):
        load_checkpoint(path, backbone=split_backbone_path(wrong))


def test_unconverted_dinov2_backbone_is_explained(tmp_path):
    path = write_random_checkpoint(tmp_path / "split.pth", CONFIG, fmt="split")
    flat = torch.load(split_backbone_path(path), weights_only=True)
    flat["patch_embed.proj.weight"] = torch.zeros(64, 3, 14, 14)
    torch.save(flat, tmp_path / "dinov2_vitl14_pretrain.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, backbone=tmp_path / "dinov2_vitl14_pretrain.pth")
    assert "unconverted DINOv2" in exc.value.one_line()
    assert "crossearth convert-dinov2" in exc.value.one_line()


def test_full_checkpoint_ignores_backbone_with_a_warning(tmp_path):
    path = write_random_checkpoint(tmp_path / "full.pth", CONFIG)
    model = load_checkpoint(path, backbone=tmp_path / "whatever.pth")
    assert any("already holds the backbone" in w for w in model.info.warnings)


def test_convert_dinov2_matches_the_reference_recipe(tmp_path, reference):
    """Fabricate a 'Meta' DINOv2 (37×37 positions, patch 14), convert it, use it as backbone."""
    x, _ = reference
    g = torch.Generator().manual_seed(5)
    c = CONFIG.embed_dim
    flat = torch.load(
        split_backbone_path(write_random_checkpoint(tmp_path / "s.pth", CONFIG, fmt="split")),
        weights_only=True,
    )
    meta = dict(flat)
    meta["pos_embed"] = torch.randn(1, 1 + 37 * 37, c, generator=g)
    meta["patch_embed.proj.weight"] = torch.randn(c, 3, 14, 14, generator=g)
    torch.save(meta, tmp_path / "dinov2_vitl14_pretrain.pth")
    out = convert_dinov2_file(
        tmp_path / "dinov2_vitl14_pretrain.pth", tmp_path / "conv.pth", img_size=128
    )
    conv = torch.load(out, weights_only=True)
    grid = meta["pos_embed"][:, 1:].reshape(1, 37, 37, c).permute(0, 3, 1, 2)
    want_pos = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    want_pos = torch.cat([meta["pos_embed"][:, :1], want_pos.flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(conv["pos_embed"], want_pos)
    want_w = F.interpolate(
        meta["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(conv["patch_embed.proj.weight"], want_w)
    assert torch.equal(conv["blocks.0.attn.qkv.weight"], meta["blocks.0.attn.qkv.weight"])
    model = load_checkpoint(tmp_path / "s.pth", backbone=out)
    assert run(model, x).shape == (2, 6, 96, 128)
    with pytest.raises(CheckpointError, match="already converted"):
        convert_dinov2_file(out, tmp_path / "again.pth")


def test_preset_file_name_fills_in_classes(tmp_path):
    config = tiny_config(num_classes=2, img_size=512)
    path = write_random_checkpoint(tmp_path / "WHU-Building-A2S.pth", config, fmt="bare")
    model = load_checkpoint(path)
    assert model.info.preset == "whu-building-a2s"
    assert model.info.classes == ["Building", "Background"]
    assert model.info.bands == "RGB" and model.info.crop_size == 512 and model.info.stride == 341
    assert model.info.warnings == []


def _tiling(path: Path, **kw) -> tuple[int, int, list[str]]:
    from crossearth_cli.loading import resolve_model

    notes: list[str] = []
    spec = resolve_model(checkpoint=path, notes=notes, **kw)
    return spec.crop, spec.stride, notes


def test_a_checkpoint_without_tiling_is_tiled_at_its_models_size(tmp_path):
    """The spec's 1024 models use crop 1024, stride 683: a bare file (no training config) of
    another size must not fall back to 512's tiles, which would squeeze its position grid."""
    path = write_random_checkpoint(tmp_path / "m.pth", tiny_config(img_size=256), fmt="bare")
    assert _tiling(path) == (256, 171, [])
    convert_checkpoint(path, tmp_path / "m.safetensors")
    # the same weights tile alike in either format
    assert _tiling(tmp_path / "m.safetensors")[:2] == (256, 171)


def test_a_file_named_like_a_preset_but_of_another_size_is_tiled_at_its_own(tmp_path):
    config = tiny_config(num_classes=2, img_size=128)
    path = write_random_checkpoint(tmp_path / "WHU-Building-A2S.pth", config, fmt="bare")
    crop, stride, notes = _tiling(path)
    assert (crop, stride) == (128, 85)
    assert len(notes) == 1 and "named like preset whu-building-a2s" in notes[0]
    assert "(512×512 inputs) but its model takes 128×128; tiles of 128 used" in notes[0]
    assert load_checkpoint(path).info.classes == ["Building", "Background"]


def test_a_released_split_file_refuses_a_backbone_of_another_size(tmp_path):
    """Potsdam(r)-source.pth is a 512 model: a 1024-style backbone (here 256) is refused even
    when the file carries no training config saying so (spec §3.1)."""
    path = write_random_checkpoint(tmp_path / "Potsdam(r)-source.pth", CONFIG, fmt="split")
    raw = torch.load(path, weights_only=True)
    raw.pop("meta", None)  # no config text: only the released name tells its size
    torch.save(raw, path)
    wrong = write_random_checkpoint(tmp_path / "other.pth", tiny_config(img_size=256), fmt="split")
    with pytest.raises(CheckpointError, match="for 256×256 inputs.*trained at 512×512"):
        load_checkpoint(path, backbone=split_backbone_path(wrong))


def test_unusable_device_is_a_config_error(tmp_path):
    from crossearth_cli.errors import ConfigError

    path = write_random_checkpoint(tmp_path / "m.pth", CONFIG)
    with pytest.raises(ConfigError, match="cannot use device 'nonsense'"):
        load_checkpoint(path, device="nonsense")
