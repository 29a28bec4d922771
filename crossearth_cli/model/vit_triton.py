"""Fused element-wise passes of the ViT-L backbone for CUDA (Triton): four kernels per layer.

Eager autocast runs the backbone's float32 element-wise work one op at a time over the
B×1025×1024 residual stream: LayerNorm, the cast to bf16 before every Linear, LayerScale, the
residual adds, the Rein update's adds, scale and ``torch.cat``. Per layer and token that is
~128·C bytes of memory traffic in ~20 kernels; here it is ~60·C bytes in 4 kernels plus GELU
(``ct`` is the autocast dtype, rows are tokens):

    h = ct(LN1(x))                                  # layer 0 only; later from the Rein kernel
    y = proj(attn(qkv(h)))                          # GEMMs + SDPA, unchanged
    x, h = x + γ1·y, ct(LN2(x + γ1·y))              # residual_norm
    u = fc2(gelu(fc1(h)))                           # unchanged
    x, f = x + γ2·u, ct(x + γ2·u)[:, 1:]            # residual_cast
    d = softmax(f·Tᵀ/√C)·V                          # Rein attention, unchanged
    s = ct(d + x[:, 1:])                            # add_cast
    m = mlp_delta_f(s)                              # unchanged
    x[:, 1:] += ct(ct(α)·m); h = ct(LN1'(x))        # rein_residual_norm, in place; next layer's
                                                    # norm1 (none after the last layer)

Each kernel does autocast's own arithmetic (float32, the same promotions and roundings; the 0-d
Rein scale is rounded to ``ct`` first as CUDA's mixed-dtype multiply does) without fused
multiply-adds. On an H200 each kernel gave eager's bits (LayerNorm included) and the model ran
1.25× faster (289.4 against 231.5 tiles/s, ViT-L 512², batch 16); whole-model scores differ
from eager by rounding (the GEMMs see the same values but not always the same kernels) and are
as close to the float32 model as eager's (relative error 1.255e-2 against 1.249e-2;
docs/performance.md).

``ReinsDinoVisionTransformer.forward_features`` uses it on CUDA under autocast with no gradient
and a Rein, when Triton imports; ``CROSSEARTH_FUSED_VIT=0`` keeps the eager blocks. Without a
GPU it runs under Triton's interpreter, which is how the tests check it:

    TRITON_INTERPRET=1 python -m crossearth_cli.model.vit_triton   # compare with eager
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from crossearth_cli.model.attention import attention

__all__ = ["fused_forward_features", "check_kernels", "check"]


# --- kernels: one program per token row of C channels ----------------------------------------


@triton.jit
def _layer_norm(x, w_ptr, b_ptr, cols, mask, C, eps):
    """LayerNorm of one float32 row (masked lanes hold 0), as PyTorch: biased variance."""
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    return d * rstd * w + b


@triton.jit
def _layer_scale_residual(x_ptr, y_ptr, g_ptr, row, cols, mask, C):
    """x += γ·y for one row, float32, stored in place; returns the new row."""
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=mask, other=0.0)
    x = x + y * g
    tl.store(x_ptr + row * C + cols, x, mask=mask)
    return x


@triton.jit
def _norm_cast_kernel(x_ptr, w_ptr, b_ptr, h_ptr, C, eps, BLOCK: tl.constexpr):
    # h = ct(LN(x))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0)
    h = _layer_norm(x, w_ptr, b_ptr, cols, mask, C, eps)
    tl.store(h_ptr + row * C + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_norm_kernel(x_ptr, y_ptr, g_ptr, w_ptr, b_ptr, h_ptr, C, eps,
                          BLOCK: tl.constexpr):
    # x += γ·y (float32, in place); h = ct(LN(x))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = _layer_scale_residual(x_ptr, y_ptr, g_ptr, row, cols, mask, C)
    h = _layer_norm(x, w_ptr, b_ptr, cols, mask, C, eps)
    tl.store(h_ptr + row * C + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_cast_kernel(x_ptr, y_ptr, g_ptr, c_ptr, N, C, BLOCK: tl.constexpr):
    # x += γ·y (float32, in place); patch rows also to c = ct(x), B·N rows without the cls
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = _layer_scale_residual(x_ptr, y_ptr, g_ptr, row, cols, mask, C)
    if row % (N + 1) > 0:
        r = row - row // (N + 1) - 1
        tl.store(c_ptr + r * C + cols, x.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_cast_kernel(d_ptr, x_ptr, s_ptr, N, C, BLOCK: tl.constexpr):
    # patch row r (of B·N): s = ct(d + x), x's row skipping each image's cls token
    r = tl.program_id(0).to(tl.int64)
    xr = r + r // N + 1
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    d = tl.load(d_ptr + r * C + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + xr * C + cols, mask=mask, other=0.0)
    tl.store(s_ptr + r * C + cols, (d + x).to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rein_residual_norm_kernel(x_ptr, m_ptr, scale_ptr, w_ptr, b_ptr, h_ptr, N, C, eps,
                               HAS_NORM: tl.constexpr, BLOCK: tl.constexpr):
    # token rows of x (B·(1+N)): patch rows += ct(ct(α)·m), cls rows unchanged; then, when the
    # next layer exists, h = ct(LN(x)) for it
    row = tl.program_id(0).to(tl.int64)
    t = row % (N + 1)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0)
    if t > 0:
        r = row - row // (N + 1) - 1
        m = tl.load(m_ptr + r * C + cols, mask=mask, other=0.0)
        alpha = tl.load(scale_ptr).to(m.dtype).to(tl.float32)
        x = x + (alpha * m.to(tl.float32)).to(m.dtype).to(tl.float32)
        tl.store(x_ptr + row * C + cols, x, mask=mask)
    if HAS_NORM:
        h = _layer_norm(x, w_ptr, b_ptr, cols, mask, C, eps)
        tl.store(h_ptr + row * C + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


# --- launches ----------------------------------------------------------------------------------


def _launch(kernel, rows: int, c: int, *args, **meta) -> None:
    # no fused multiply-adds: eager computes x + γ·y as two roundings, and the float32
    # residual stream should keep eager's bits through all 24 layers
    block = triton.next_power_of_2(c)
    kernel[(rows,)](*args, BLOCK=block, num_warps=4 if block <= 1024 else 8,
                    enable_fp_fusion=False, **meta)


def norm_cast(x: torch.Tensor, norm: torch.nn.LayerNorm, ct: torch.dtype) -> torch.Tensor:
    h = torch.empty(x.shape, dtype=ct, device=x.device)
    _launch(_norm_cast_kernel, x.numel() // x.shape[-1], x.shape[-1],
            x, norm.weight, norm.bias, h, x.shape[-1], norm.eps)
    return h


def residual_norm(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor,
                  norm: torch.nn.LayerNorm) -> torch.Tensor:
    """x += γ·y in place; returns ct(norm(x)) with ct = y's dtype."""
    h = torch.empty(x.shape, dtype=y.dtype, device=x.device)
    _launch(_residual_norm_kernel, x.numel() // x.shape[-1], x.shape[-1],
            x, y.contiguous(), gamma, norm.weight, norm.bias, h, x.shape[-1], norm.eps)
    return h


def residual_cast(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x += γ·y in place (x: B×(1+N)×C); returns the patch tokens x[:, 1:] in y's dtype,
    contiguous B×N×C (what the Rein attention reads)."""
    b, n1, c = x.shape
    out = torch.empty(b, n1 - 1, c, dtype=y.dtype, device=x.device)
    _launch(_residual_cast_kernel, b * n1, c, x, y.contiguous(), gamma, out, n1 - 1, c)
    return out


def add_cast(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d: B×N×C (ct), x: B×(1+N)×C float32 -> ct(d + x[:, 1:])."""
    b, n, c = d.shape
    s = torch.empty(d.shape, dtype=d.dtype, device=d.device)
    _launch(_add_cast_kernel, b * n, c, d.contiguous(), x, s, n, c)
    return s


def rein_residual_norm(x: torch.Tensor, m: torch.Tensor, scale: torch.Tensor,
                       norm: torch.nn.LayerNorm | None) -> torch.Tensor | None:
    """x[:, 1:] += ct(ct(scale)·m) in place; returns ct(norm(x)), or None without a norm."""
    b, n1, c = x.shape
    h = torch.empty(x.shape, dtype=m.dtype, device=x.device) if norm is not None else x
    w, bias, eps = (norm.weight, norm.bias, norm.eps) if norm is not None else (x, x, 0.0)
    _launch(_rein_residual_norm_kernel, b * n1, c, x, m.contiguous(), scale, w, bias, h,
            n1 - 1, c, eps, HAS_NORM=norm is not None)
    return h if norm is not None else None


# --- the backbone's forward with them ----------------------------------------------------------


def fused_forward_features(vit, x: torch.Tensor) -> list[torch.Tensor]:
    """``ReinsDinoVisionTransformer.forward_features(x)`` (with the Rein) through the fused
    kernels, under the autocast in force (its dtype is ``ct``). Triton launches on the current
    CUDA device: it is made ``x``'s, as for the other kernels."""
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return _fused_forward_features(vit, x)


def _fused_forward_features(vit, x: torch.Tensor) -> list[torch.Tensor]:
    ct = torch.get_autocast_dtype(x.device.type)
    t, gh, gw = vit.tokens(x)
    t = t.float().contiguous()  # B×(1+N)×C, the float32 residual stream, updated in place
    b = t.shape[0]
    static = vit.reins.static()
    reins = vit.reins
    blocks = list(vit.blocks)
    h = norm_cast(t, blocks[0].norm1, ct)
    outs = []
    for i, blk in enumerate(blocks):
        h = residual_norm(t, blk.attn(h), blk.ls1.gamma, blk.norm2)
        f = residual_cast(t, blk.mlp(h), blk.ls2.gamma)  # B×N×C patch tokens in ct
        d = attention(  # the Rein attention on the patch tokens, as LoRAReins.update
            f[:, None],  # B×1×N×C
            static.tokens[i].to(ct)[None, None].expand(b, 1, -1, -1),
            static.values[i].to(ct)[None, None].expand(b, 1, -1, -1),
            scale=reins.embed_dims**-0.5,
        )[:, 0]  # B×N×C
        m = reins.mlp_delta_f(add_cast(d, t))
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else None
        h = rein_residual_norm(t, m, reins.scale, nxt)
        if i in vit.out_indices:
            for _ in range(vit.out_indices.count(i)):  # copies: t changes in place
                outs.append(t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw).clone())
    return outs


# --- self-check --------------------------------------------------------------------------------


@contextlib.contextmanager
def interpreter_rounds_to_nearest():
    """Triton's interpreter (3.x) truncates float32 -> bf16/fp16 where GPUs round to nearest
    even, as PyTorch does; make it round, so the checks can ask for equal bits on the CPU."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._convert_float
    targets = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}

    def convert(data, src, dst, rounding_mode):
        if src != tl.float32 or dst not in targets:
            return original(data, src, dst, rounding_mode)
        flat = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32).reshape(-1))
        bits = flat.to(targets[dst]).view(torch.int16).numpy().view(np.uint16)
        return bits.reshape(np.shape(data))

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = original


def check_kernels(device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Each kernel against the eager ops it replaces, on random rows (B=2, N=5, C=96).

    The residual stream and the casts without a LayerNorm must match exactly (``*_equal``); the
    LayerNorm outputs may differ in the last bit of a few elements (reduction order).
    """
    import torch.nn.functional as F

    torch.manual_seed(0)
    b, n, c = 2, 5, 96
    norm = torch.nn.LayerNorm(c, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(b, n + 1, c, device=device)
    y = torch.randn(b, n + 1, c, device=device).to(dtype)
    g = torch.randn(c, device=device)
    d = torch.randn(b, n, c, device=device).to(dtype)
    m = torch.randn(b, n, c, device=device).to(dtype)
    alpha = torch.tensor(0.3, device=device)  # not a bf16/fp16 value: its rounding shows

    def ln(v):
        return F.layer_norm(v, (c,), norm.weight, norm.bias, norm.eps).to(dtype)

    def ln_report(want, got):
        return {"max_abs_diff": float((want.float() - got.float()).abs().max()),
                "equal_share": float((want == got).float().mean())}

    out: dict = {}
    with torch.inference_mode():
        out["norm_cast"] = ln_report(ln(x), norm_cast(x, norm, dtype))
        xr = x.clone()
        h = residual_norm(xr, y, g, norm)
        want_x = x + y * g  # bf16 · float32 -> float32, as eager LayerScale
        out["residual_norm"] = {"x_equal": bool(torch.equal(xr, want_x)),
                                **ln_report(ln(want_x), h)}
        xr = x.clone()
        cast = residual_cast(xr, y, g)
        out["residual_cast"] = {"x_equal": bool(torch.equal(xr, want_x)),
                                "cast_equal": bool(torch.equal(cast, want_x[:, 1:].to(dtype)))}
        out["add_cast"] = {"equal": bool(torch.equal(add_cast(d, x), (d + x[:, 1:]).to(dtype)))}
        xr = x.clone()
        h = rein_residual_norm(xr, m, alpha, norm)
        want_x = x.clone()  # CUDA's bf16 · 0-d float32: the scalar is rounded to bf16 first
        want_x[:, 1:] += (alpha.to(dtype).float() * m.float()).to(dtype)
        out["rein_residual_norm"] = {"x_equal": bool(torch.equal(xr, want_x)),
                                     **ln_report(ln(want_x), h)}
        xr = x.clone()
        rein_residual_norm(xr, m, alpha, None)
        out["rein_residual"] = {"x_equal": bool(torch.equal(xr, want_x))}
    return out


def check(device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """A small random CrossEarth, eager against fused under ``dtype`` autocast: largest relative
    difference of the four feature maps, of the scores, and class agreement."""
    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model.backbone import FUSED_VIT
    from crossearth_cli.model.random_init import random_state_dict, tiny_config

    config = tiny_config(embed_dim=96)  # C not a power of two: masked lanes are exercised
    net = CrossEarth(config)
    net.load_state_dict(random_state_dict(config, seed=0))
    net = net.to(device).eval()
    with torch.no_grad():  # a visible Rein and LayerScale: the random init's 1e-3/1e-5 hide them
        net.backbone.reins.scale.fill_(0.5)
        for blk in net.backbone.blocks:
            blk.ls1.gamma.normal_(0, 0.5)
            blk.ls2.gamma.normal_(0, 0.5)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 48, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype):
        want = net.backbone.forward_features(x, fused=False)
        got = net.backbone.forward_features(x, fused=True)
        got_scores = net(x).float()  # fused by default (CUDA or the interpreter)
        with FUSED_VIT.switched_off():
            want_scores = net(x).float()
    maps = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(want, got))
    return {"maps_max_rel_diff": maps,
            "scores_max_rel_diff": float((want_scores - got_scores).abs().max()
                                         / want_scores.abs().max()),
            "class_agreement": float((want_scores.argmax(1) == got_scores.argmax(1))
                                     .float().mean())}


if __name__ == "__main__":
    import json

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    exact = interpreter_rounds_to_nearest() if dev == "cpu" else contextlib.nullcontext()
    with exact:
        print(json.dumps({"kernels": check_kernels(dev), "model": check(dev)}))
