"""The ViT-L model has exactly the official keys, shapes and parameter count (reference §3),
checked on the meta device: nothing is allocated and nothing runs."""

from __future__ import annotations

import pytest
import torch

from crossearth_cli.model import CrossEarth, infer_config
from crossearth_cli.model.config import default_out_indices
from crossearth_cli.model.random_init import tiny_config, vit_large_config


def reference_table(num_classes: int = 6, img_size: int = 512) -> dict[str, tuple[int, ...]]:
    """Reference §3.2, transcribed row by row."""
    e, d, ffn_enc, ffn_dec = 1024, 256, 1024, 2048
    t: dict[str, tuple[int, ...]] = {
        "backbone.cls_token": (1, 1, e),
        "backbone.pos_embed": (1, (img_size // 16) ** 2 + 1, e),
        "backbone.mask_token": (1, e),
        "backbone.patch_embed.proj.weight": (e, 3, 16, 16),
        "backbone.patch_embed.proj.bias": (e,),
        "backbone.norm.weight": (e,),
        "backbone.norm.bias": (e,),
        "backbone.reins.scale": (),
        "backbone.reins.learnable_tokens_a": (24, 100, 16),
        "backbone.reins.learnable_tokens_b": (24, 16, e),
        "backbone.reins.mlp_token2feat.weight": (e, e),
        "backbone.reins.mlp_token2feat.bias": (e,),
        "backbone.reins.mlp_delta_f.weight": (e, e),
        "backbone.reins.mlp_delta_f.bias": (e,),
        "backbone.reins.transform.weight": (d, e),
        "backbone.reins.transform.bias": (d,),
        "backbone.reins.merge.weight": (d, 3 * d),
        "backbone.reins.merge.bias": (d,),
    }
    for i in range(24):
        b = f"backbone.blocks.{i}."
        t.update(
            {
                b + "norm1.weight": (e,),
                b + "norm1.bias": (e,),
                b + "attn.qkv.weight": (3 * e, e),
                b + "attn.qkv.bias": (3 * e,),
                b + "attn.proj.weight": (e, e),
                b + "attn.proj.bias": (e,),
                b + "ls1.gamma": (e,),
                b + "norm2.weight": (e,),
                b + "norm2.bias": (e,),
                b + "mlp.fc1.weight": (4 * e, e),
                b + "mlp.fc1.bias": (4 * e,),
                b + "mlp.fc2.weight": (e, 4 * e),
                b + "mlp.fc2.bias": (e,),
                b + "ls2.gamma": (e,),
            }
        )
    h = "decode_head."
    pd = h + "pixel_decoder."
    for i in range(3):
        t.update(
            {
                pd + f"input_convs.{i}.conv.weight": (d, e, 1, 1),
                pd + f"input_convs.{i}.conv.bias": (d,),
                pd + f"input_convs.{i}.gn.weight": (d,),
                pd + f"input_convs.{i}.gn.bias": (d,),
            }
        )
    for i in range(6):
        L = pd + f"encoder.layers.{i}."
        t.update(
            {
                L + "self_attn.sampling_offsets.weight": (192, d),
                L + "self_attn.sampling_offsets.bias": (192,),
                L + "self_attn.attention_weights.weight": (96, d),
                L + "self_attn.attention_weights.bias": (96,),
                L + "self_attn.value_proj.weight": (d, d),
                L + "self_attn.value_proj.bias": (d,),
                L + "self_attn.output_proj.weight": (d, d),
                L + "self_attn.output_proj.bias": (d,),
                L + "ffn.layers.0.0.weight": (ffn_enc, d),
                L + "ffn.layers.0.0.bias": (ffn_enc,),
                L + "ffn.layers.1.weight": (d, ffn_enc),
                L + "ffn.layers.1.bias": (d,),
                L + "norms.0.weight": (d,),
                L + "norms.0.bias": (d,),
                L + "norms.1.weight": (d,),
                L + "norms.1.bias": (d,),
            }
        )
    t.update(
        {
            pd + "level_encoding.weight": (3, d),
            pd + "lateral_convs.0.conv.weight": (d, e, 1, 1),
            pd + "lateral_convs.0.gn.weight": (d,),
            pd + "lateral_convs.0.gn.bias": (d,),
            pd + "output_convs.0.conv.weight": (d, d, 3, 3),
            pd + "output_convs.0.gn.weight": (d,),
            pd + "output_convs.0.gn.bias": (d,),
            pd + "mask_feature.weight": (d, d, 1, 1),
            pd + "mask_feature.bias": (d,),
        }
    )
    td = h + "transformer_decoder."
    for i in range(9):
        L = td + f"layers.{i}."
        for att in ("self_attn", "cross_attn"):
            t.update(
                {
                    L + f"{att}.attn.in_proj_weight": (3 * d, d),
                    L + f"{att}.attn.in_proj_bias": (3 * d,),
                    L + f"{att}.attn.out_proj.weight": (d, d),
                    L + f"{att}.attn.out_proj.bias": (d,),
                }
            )
        t.update(
            {
                L + "ffn.layers.0.0.weight": (ffn_dec, d),
                L + "ffn.layers.0.0.bias": (ffn_dec,),
                L + "ffn.layers.1.weight": (d, ffn_dec),
                L + "ffn.layers.1.bias": (d,),
            }
        )
        for n in range(3):
            t[L + f"norms.{n}.weight"] = (d,)
            t[L + f"norms.{n}.bias"] = (d,)
    t.update(
        {
            td + "post_norm.weight": (d,),
            td + "post_norm.bias": (d,),
            h + "level_embed.weight": (3, d),
            h + "cls_embed.weight": (num_classes + 1, d),
            h + "cls_embed.bias": (num_classes + 1,),
            h + "querys2feat.weight": (d, d),
            h + "querys2feat.bias": (d,),
        }
    )
    for n in (0, 2, 4):
        t[h + f"mask_embed.{n}.weight"] = (d, d)
        t[h + f"mask_embed.{n}.bias"] = (d,)
    return t


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CrossEarth(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vit_large_keys_and_shapes_equal_the_reference_table():
    ours = meta_shapes(vit_large_config(num_classes=6))
    ref = reference_table(6)
    assert len(ref) == 646
    assert len(ours) == 646
    assert sorted(set(ours) - set(ref)) == []
    assert sorted(set(ref) - set(ours)) == []
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert wrong == {}
    # part counts of §3.2: 343 ViT + 11 Rein + 292 head
    assert sum(k.startswith("backbone.reins.") for k in ours) == 11
    assert sum(k.startswith("decode_head.") for k in ours) == 292


@pytest.mark.parametrize(
    ("num_classes", "img_size", "total"),
    [(6, 512, 327_766_216), (5, 512, 327_765_959), (2, 512, 327_765_188), (6, 1024, 330_911_944)],
)
def test_vit_large_parameter_count_matches_the_reference(num_classes, img_size, total):
    shapes = meta_shapes(vit_large_config(num_classes=num_classes, img_size=img_size))
    numel = {k: torch.Size(s).numel() for k, s in shapes.items()}
    assert sum(numel.values()) == total

    def part(prefix, exclude=()):
        return sum(
            n for k, n in numel.items() if k.startswith(prefix) and not k.startswith(exclude)
        )

    if img_size == 512:
        assert part("backbone.", exclude=("backbone.reins.",)) == 304_199_680
    assert part("backbone.reins.") == 2_990_081
    assert part("decode_head.pixel_decoder.") == 6_101_440
    assert part("decode_head.transformer_decoder.") == 14_209_280
    assert part("decode_head.") == 20_575_427 + 257 * (num_classes - 2)


def test_parameters_equal_state_dict_no_hidden_buffers():
    """Everything in the state dict is a parameter: the cached Rein queries, positional
    encodings and normalisation constants must never leak into checkpoints."""
    with torch.device("meta"):
        model = CrossEarth(tiny_config())
    assert set(model.state_dict()) == {k for k, _ in model.named_parameters()}


@pytest.mark.parametrize("config", [vit_large_config(6), vit_large_config(2, img_size=1024)])
def test_infer_config_recovers_vit_large_from_shapes_alone(config):
    with torch.device("meta"):
        sd = CrossEarth(config).state_dict()
    assert infer_config(sd) == config


def test_infer_config_recovers_the_tiny_model():
    config = tiny_config(num_classes=3)
    with torch.device("meta"):
        sd = CrossEarth(config).state_dict()
    assert infer_config(sd) == config


def test_out_indices_rule():
    assert default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(4) == (0, 1, 2, 3)
    for depth in range(1, 40):
        idx = default_out_indices(depth)
        assert list(idx) == sorted(idx) and idx[-1] == depth - 1 and idx[0] >= 0
