"""Each component against a reference computed another way inside the test."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossearth_cli.model import CrossEarth
from crossearth_cli.model.backbone import interpolate_pos_embed
from crossearth_cli.model.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from crossearth_cli.model.positional import sine_position_encoding
from crossearth_cli.model.random_init import random_state_dict, tiny_config
from crossearth_cli.model.reins import LoRAReins
from crossearth_cli.model.transformer_decoder import DecoderLayer


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(num_classes=6, img_size=128)
    model = CrossEarth(config).eval()
    model.load_state_dict(random_state_dict(config, seed=1))
    return model


# -- multi-scale deformable attention -------------------------------------------------------


def naive_msda(value, shapes, loc, weights):
    """Per-point loop: bilinear sampling by hand, zero outside the map, align_corners=False
    (pixel centres at (i + 0.5) / size)."""
    b, _, nh, d = value.shape
    _, nq, _, nl, npts, _ = loc.shape
    out = torch.zeros(b, nq, nh, d, dtype=torch.float64)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for bi in range(b):
        for q in range(nq):
            for hd in range(nh):
                for lv, (h, w) in enumerate(shapes):
                    for p in range(npts):
                        x = loc[bi, q, hd, lv, p, 0].item() * w - 0.5
                        y = loc[bi, q, hd, lv, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        acc = torch.zeros(d, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    v = value[bi, starts[lv] + yy * w + xx, hd].double()
                                    acc += wy * wx * v
                        out[bi, q, hd] += weights[bi, q, hd, lv, p].item() * acc
    return out.reshape(b, nq, nh * d)


def test_msda_core_matches_a_per_point_loop():
    g = seeded(3)
    shapes = [(2, 3), (4, 5), (7, 6)]
    b, nq, nh, d, npts = 2, 5, 2, 3, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), nh, d, generator=g)
    # locations spill outside [0, 1] to exercise the zero padding
    loc = torch.rand(b, nq, nh, len(shapes), npts, 2, generator=g) * 1.4 - 0.2
    w = torch.rand(b, nq, nh, len(shapes), npts, generator=g)
    # the core's queries-last layout: one head per batch entry, grid_sample units
    nl = len(shapes)
    value_t = value.permute(0, 2, 3, 1).reshape(b * nh, d, -1)  # (B·h)×d×S
    grids = (2 * loc - 1).permute(3, 0, 2, 4, 1, 5).reshape(nl, b * nh, npts, nq, 2)
    w_t = w.permute(0, 2, 3, 4, 1).reshape(b * nh, nl, npts, nq)
    got = ms_deform_attn_core(value_t, shapes, grids, w_t)  # (B·h)×d×Nq
    got = got.view(b, nh * d, nq).transpose(1, 2)
    want = naive_msda(value, shapes, loc, w)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_msda_module_reads_offsets_as_heads_levels_points_xy():
    g = seeded(4)
    c, nh, nl, npts = 8, 2, 3, 2
    shapes = [(2, 2), (3, 4), (5, 3)]
    s = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(c, nh, nl, npts)
    for p in attn.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    x = torch.randn(1, s, c, generator=g)
    pos = torch.randn(1, s, c, generator=g)
    ref = torch.rand(1, s, nl, 2, generator=g)
    got = attn(x, pos, ref, shapes)

    q = x + pos
    value = (x @ attn.value_proj.weight.T + attn.value_proj.bias).view(1, s, nh, c // nh)
    raw_off = q @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias
    raw_w = q @ attn.attention_weights.weight.T + attn.attention_weights.bias
    loc = torch.zeros(1, s, nh, nl, npts, 2)
    wts = torch.zeros(1, s, nh, nl, npts)
    for qi in range(s):
        for h in range(nh):
            logits = raw_w[0, qi, h * nl * npts : (h + 1) * nl * npts]
            probs = logits.softmax(0)  # over the 12 (here 6) level-point pairs of a head
            for lv, (hh, ww) in enumerate(shapes):
                for p in range(npts):
                    base = ((h * nl + lv) * npts + p) * 2
                    loc[0, qi, h, lv, p, 0] = ref[0, qi, lv, 0] + raw_off[0, qi, base] / ww
                    loc[0, qi, h, lv, p, 1] = ref[0, qi, lv, 1] + raw_off[0, qi, base + 1] / hh
                    wts[0, qi, h, lv, p] = probs[lv * npts + p]
    sampled = naive_msda(value, shapes, loc, wts).float()
    want = x + sampled @ attn.output_proj.weight.T + attn.output_proj.bias
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- ViT blocks against timm's stock ViT --------------------------------------------------------


def test_vit_blocks_without_rein_match_timm_dinov2_style_vit(tiny):
    from timm.models.vision_transformer import VisionTransformer

    cfg = tiny.config
    vit = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=16,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_dim / cfg.embed_dim,
        qkv_bias=True,
        init_values=1e-5,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        class_token=True,
        reg_tokens=0,
        global_pool="",
        num_classes=0,
    ).eval()
    for blk in vit.blocks:  # the plain softmax(q·kᵀ)·v path, not the fused kernel
        blk.attn.fused_attn = False
    sd = {
        k[len("backbone.") :]: v
        for k, v in tiny.state_dict().items()
        if k.startswith("backbone.") and not k.startswith(("backbone.reins.", "backbone.mask_"))
    }
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=seeded(5))
    with torch.no_grad():
        want = vit.forward_intermediates(
            x, indices=list(cfg.out_indices), norm=False, output_fmt="NCHW", intermediates_only=True
        )
        got = tiny.backbone.forward_features(x, use_rein=False)
    assert len(got) == 4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # and with Rein on the maps really change (the adapter is not a no-op)
    with torch.no_grad():
        with_rein = tiny.backbone.forward_features(x)
    assert (with_rein[-1] - got[-1]).abs().mean() > 1e-2


def test_feature_pyramid_strides(tiny):
    x = torch.randn(1, 3, 128, 96, generator=seeded(6))
    with torch.no_grad():
        feats, queries = tiny.backbone(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert tuple(queries.shape) == (tiny.config.token_length, tiny.config.feat_channels)
    # ×0.5 bilinear without antialias on an even grid is 2×2 average pooling (reference §1.2)
    with torch.no_grad():
        last = tiny.backbone.forward_features(x)[-1]
    torch.testing.assert_close(feats[3], F.avg_pool2d(last, 2), atol=1e-6, rtol=1e-6)


# -- Rein -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reins():
    g = seeded(7)
    r = LoRAReins(num_layers=5, embed_dims=32, token_length=7, lora_dim=3, query_dims=16)
    for p in r.parameters():
        p.data = torch.randn(p.shape, generator=g) * (0.5 if p.ndim else 1.0)
    return r.eval()


def test_rein_update_matches_the_reference_formula(reins):
    x = torch.randn(2, 1 + 11, 32, generator=seeded(8))
    layer = 3
    # direct transcription, sequence-first as in the original (batch_first=True input)
    feats = x.permute(1, 0, 2)
    cls_token, feats = torch.tensor_split(feats, [1], dim=0)
    tokens = reins.learnable_tokens_a[layer] @ reins.learnable_tokens_b[layer]
    attn = torch.einsum("nbc,mc->nbm", feats, tokens) * (32**-0.5)
    attn = F.softmax(attn, dim=-1)
    delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], reins.mlp_token2feat(tokens[1:, :]))
    delta = reins.mlp_delta_f(delta + feats) * reins.scale
    want = torch.cat([cls_token, feats + delta], dim=0).permute(1, 0, 2)
    with torch.no_grad():
        got = reins(x, layer)
        want = want.detach()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 0], x[:, 0])  # the cls token passes unchanged


def test_rein_queries_match_the_reference_merge(reins):
    with torch.no_grad():
        tokens = reins.learnable_tokens_a @ reins.learnable_tokens_b  # L×T×C
        t = reins.transform(tokens).permute(1, 2, 0)  # T×Q×L
        pooled = torch.cat(
            [
                F.max_pool1d(t, kernel_size=t.shape[-1]),
                F.avg_pool1d(t, kernel_size=t.shape[-1]),
                t[:, :, -1].unsqueeze(-1),
            ],
            dim=-1,
        )  # T×Q×3
        want = reins.merge(pooled.flatten(-2, -1))
        got = reins.queries()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rein_queries_are_cached_and_invalidated(tiny):
    r = tiny.backbone.reins
    with torch.inference_mode():
        first = r.static()
        assert r.static() is first  # computed once, not per forward
    with torch.no_grad():
        r.merge.bias.add_(1.0)
        second = r.static()
        r.merge.bias.sub_(1.0)
    assert second is not first
    torch.testing.assert_close(second.queries, first.queries + 1.0)
    with torch.no_grad():
        third = r.static()
    torch.testing.assert_close(third.queries, first.queries)
    tiny.train()
    try:
        with torch.no_grad():
            assert r.static() is not r.static()  # training: always fresh
    finally:
        tiny.eval()


# -- positions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("gh", "gw"), [(3, 5), (5, 3), (7, 7), (9, 13), (8, 5), (11, 2)])
def test_pos_embed_interpolation_uses_scale_factor_not_size(gh, gw):
    g, c = 8, 6
    pos = torch.randn(1, 1 + g * g, c, generator=seeded(9))
    got = interpolate_pos_embed(pos, gh, gw)
    grid = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    by_scale = F.interpolate(
        grid, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic", align_corners=False
    )
    want = torch.cat([pos[:, :1], by_scale.permute(0, 2, 3, 1).reshape(1, gh * gw, c)], dim=1)
    torch.testing.assert_close(got, want)
    by_size = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    assert not torch.allclose(got[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, gh * gw, c))
    # rows follow the height
    assert got.shape == (1, 1 + gh * gw, c)


def test_pos_embed_used_as_stored_on_the_native_grid(tiny):
    pos = tiny.backbone.pos_embed
    g = tiny.config.grid_size
    assert torch.equal(interpolate_pos_embed(pos, g, g), pos.float())
    x = torch.randn(1, 3, 48, 80, generator=seeded(10))
    with torch.no_grad():
        tokens, gh, gw = tiny.backbone.tokens(x)
        patches = tiny.backbone.patch_embed(x)
    assert (gh, gw) == (3, 5)
    want = patches + interpolate_pos_embed(pos, 3, 5)[:, 1:]
    torch.testing.assert_close(tokens[:, 1:], want)


def test_sine_encoding_matches_the_formula_elementwise():
    h, w, nf = 3, 4, 6
    got = sine_position_encoding(h, w, nf)
    assert got.shape == (1, 2 * nf, h, w)
    for c in range(nf):
        div = 10000 ** (2 * (c // 2) / nf)
        fn = math.sin if c % 2 == 0 else math.cos
        for i in range(h):
            for j in range(w):
                y = (i + 1) / (h + 1e-6) * 2 * math.pi
                x = (j + 1) / (w + 1e-6) * 2 * math.pi
                assert got[0, c, i, j].item() == pytest.approx(fn(y / div), abs=1e-5)  # y first
                assert got[0, nf + c, i, j].item() == pytest.approx(fn(x / div), abs=1e-5)


# -- masked attention -----------------------------------------------------------------------------


def test_masked_cross_attention_matches_nn_multihead_attention(tiny):
    """mmdet masks are True = blocked with all-blocked rows reopened; SDPA wants True = allowed."""
    g = seeded(11)
    head = tiny.decode_head
    d, nh, q, hh, ww = 16, 4, 5, 3, 4
    layer = DecoderLayer(d, nh, 32).eval()
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    logits = torch.randn(2, q, 6, 8, generator=g)
    logits[0, 1] = -5.0  # a query blocked everywhere: must be reopened
    logits[1, 3] = 5.0
    query, qpos = torch.randn(2, q, d, generator=g), torch.randn(2, q, d, generator=g)
    mem, kpos = torch.randn(2, hh * ww, d, generator=g), torch.randn(1, hh * ww, d, generator=g)

    head_heads, head.num_heads = head.num_heads, nh
    try:
        allowed = head._allowed(logits, (hh, ww))
    finally:
        head.num_heads = head_heads
    with torch.no_grad():
        got = layer.cross_attn(query, mem, mem, qpos, kpos, allowed)

    blocked = F.interpolate(logits, (hh, ww), mode="bilinear", align_corners=False)
    blocked = blocked.flatten(2).sigmoid() < 0.5
    blocked[blocked.all(-1)] = False
    blocked = blocked.unsqueeze(1).repeat(1, nh, 1, 1).flatten(0, 1)  # (B·h)×Q×HW
    mha = nn.MultiheadAttention(d, nh, batch_first=True)
    a = layer.cross_attn.attn
    mha.load_state_dict(
        {
            "in_proj_weight": a.in_proj_weight,
            "in_proj_bias": a.in_proj_bias,
            "out_proj.weight": a.out_proj.weight,
            "out_proj.bias": a.out_proj.bias,
        }
    )
    with torch.no_grad():
        want = query + mha(query + qpos, mem + kpos.expand(2, -1, -1), mem, attn_mask=blocked)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- whole model ----------------------------------------------------------------------------------


def test_scores_are_sums_over_queries(tiny):
    x = torch.randn(2, 3, 128, 128, generator=seeded(12))
    with torch.inference_mode():
        s = tiny(x)
    assert s.shape == (2, 6, 128, 128) and s.dtype == torch.float32
    assert s.min() >= 0 and s.max() <= tiny.config.num_queries
    assert s.sum(1).max() <= tiny.config.num_queries  # the no-object column is dropped
    # random weights still give a real answer: varies over classes and pixels
    assert s.std(dim=(2, 3)).max() > 0.05  # over pixels
    assert s.mean(dim=(2, 3)).std(dim=1).min() > 0.05  # over classes
    assert len(s.argmax(1).unique()) >= 2


@pytest.mark.parametrize(("h", "w"), [(16, 16), (100, 77), (33, 130)])
def test_any_size_is_padded_with_the_mean_colour_and_cropped(tiny, h, w):
    x = torch.randn(1, 3, h, w, generator=seeded(13))
    ph, pw = max(32, -(-h // 16) * 16), max(32, -(-w // 16) * 16)
    with torch.inference_mode():
        got = tiny(x)
        padded = tiny(F.pad(x, (0, pw - w, 0, ph - h)))
    assert got.shape == (1, 6, h, w)
    torch.testing.assert_close(got, padded[..., :h, :w])


def test_bf16_autocast_runs_and_returns_float32(tiny):
    x = torch.randn(1, 3, 64, 96, generator=seeded(14))
    with torch.inference_mode():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = tiny(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_tiny_inputs_are_padded_and_malformed_ones_rejected(tiny):
    with torch.inference_mode():
        for h, w in [(1, 1), (1, 40), (15, 64)]:
            got = tiny(torch.zeros(1, 3, h, w))
            assert got.shape == (1, 6, h, w) and torch.isfinite(got).all()
    with pytest.raises(ValueError, match="B×3×H×W"):
        tiny(torch.zeros(1, 4, 64, 64))


def test_convolving_before_the_pyramid_resize_equals_the_reference_order(tiny):
    """The head runs its 1×1 convs on the stride-16 maps and resizes after; the reference
    resizes the 1024-channel maps first. Both orders must give the same class scores."""
    x = torch.randn(2, 3, 128, 96, generator=seeded(21))
    with torch.inference_mode():
        feats, queries = tiny.backbone(x)  # reference order: resized maps
        ref_cls, ref_masks = tiny.decode_head(feats, queries)
        cls, masks = tiny.forward_logits(x)  # conv first, resize after
    torch.testing.assert_close(cls, ref_cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(4, 3), (8, 6), (5, 7)])  # whole factors, and not
def test_resizing_mask_features_equals_resizing_mask_logits(size):
    """The attention masks come from mask features resized to the level; mmdet resizes the
    mask logits instead. The resize is linear per channel, so both orders give the same logits."""
    from crossearth_cli.model.head import level_mask_features, shrink_bilinear

    g = seeded(23)
    embed, features = torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, 16, 12, generator=g)
    want = shrink_bilinear(torch.einsum("bqc,bchw->bqhw", embed, features), size)
    got = torch.einsum("bqc,bchw->bqhw", embed, level_mask_features(features, size))
    assert got.shape == (2, 5, *size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decoder_masks_from_resized_features_equal_the_reference_order(tiny, monkeypatch):
    """Every layer's attention mask, and the class scores, as when each layer's full-size
    mask logits are resized (the reference order) in float32."""
    from crossearth_cli.model import head as head_module

    masks: list[torch.Tensor] = []
    allowed = head_module.ReinMask2FormerHead._allowed
    monkeypatch.setattr(head_module.ReinMask2FormerHead, "_allowed",
                        lambda self, logits, size: masks.append(allowed(self, logits, size))
                        or masks[-1])
    resized = []
    resize = head_module.level_mask_features
    monkeypatch.setattr(head_module, "level_mask_features",
                        lambda features, size: resized.append(size) or resize(features, size))
    x = torch.randn(2, 3, 128, 96, generator=seeded(22))
    with torch.inference_mode():
        got = tiny(x)
        got_masks, masks[:] = list(masks), []
        monkeypatch.setattr(head_module, "level_mask_features", lambda features, size: features)
        want = tiny(x)
    assert resized == [(4, 3), (8, 6), (16, 12)]  # once per level, not once per layer
    assert len(got_masks) == len(masks) == len(tiny.decode_head.transformer_decoder.layers)
    for g, w in zip(got_masks, masks):
        assert torch.equal(g, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
