"""GPU candidate: the pixel decoder's encoder with its norms, residual adds and casts fused
(Triton), for ``gpu_explore.py`` to time before it goes into the model.

Eager autocast runs each of the six post-norm encoder layers' float32 element-wise work one
op at a time over the B×S×256 tokens (S = 5,376 at 512²): ``x + pos``, three casts of it or
of ``x`` to bf16 for the value, offset and weight projections, the residual add and
LayerNorm after the attention, the cast before the FFN, the residual add and LayerNorm after
it. In the H200 profile (docs/results/gpu-h200-explore-run3.json, 16 tiles) the LayerNorms
of [16, 5376, 256] took 1.83 ms, their adds 0.98 ms and the casts 0.97 ms of a 58 ms batch.
Here each add-and-norm is one kernel that also writes the casts the next projections read
(``ct`` is the autocast dtype):

    x, xc = LN0(x + attn(xc, qc)), ct(·)                        # add_norm
    x, xc, qc = LN1(x + ffn(xc)), ct(·), ct(· + pos)            # add_norm with pos

The projections, the deformable-attention kernel (``msda_triton``) and the FFN are the
model's own, called on the cast tensors eager autocast would have made, so everything but
the LayerNorm's last bits (reduction order) is eager's arithmetic.

    python benchmarks/fused_pixel.py                      # on a GPU: against eager
    TRITON_INTERPRET=1 python benchmarks/fused_pixel.py   # on the CPU, as the tests run it
"""

from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from scenes import ROOT  # noqa: F401 - puts this checkout on sys.path

from crossearth_cli.model.ms_deform_attn import fused_kernel
from crossearth_cli.model.msda_triton import BLOCK_Q, _bilinear, _level_table
from crossearth_cli.model.optional_kernel import on_triton
from crossearth_cli.model.pixel_decoder import _Encoder
from crossearth_cli.model.vit_triton import _launch, _layer_norm, interpreter_rounds_to_nearest


@triton.jit
def _add_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, cast_ptr, pos_ptr, qcast_ptr, S, C,
                     eps, HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    # token row of B·S: out = LN(x + y) float32, cast = ct(out); with pos, qcast = ct(out + pos)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    o = _layer_norm(x + y, w_ptr, b_ptr, cols, mask, C, eps)
    tl.store(out_ptr + row * C + cols, o, mask=mask)
    tl.store(cast_ptr + row * C + cols, o.to(cast_ptr.dtype.element_ty), mask=mask)
    if HAS_POS:
        p = tl.load(pos_ptr + (row % S) * C + cols, mask=mask, other=0.0)
        tl.store(qcast_ptr + row * C + cols, (o + p).to(qcast_ptr.dtype.element_ty), mask=mask)


def add_norm(x: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm,
             pos: torch.Tensor | None = None):
    """x: B×S×C float32, y: B×S×C in ct -> (LN(x + y), its ct cast, ct(LN(x + y) + pos) or
    None); pos: 1×S×C float32."""
    b, s, c = x.shape
    out = torch.empty_like(x)
    cast = torch.empty(x.shape, dtype=y.dtype, device=x.device)
    qcast = torch.empty_like(cast) if pos is not None else cast
    _launch(_add_norm_kernel, b * s, c, x, y.contiguous(), norm.weight, norm.bias, out, cast,
            pos.contiguous() if pos is not None else x, qcast, s, c, norm.eps,
            HAS_POS=pos is not None)
    return out, cast, (qcast if pos is not None else None)


@triton.jit
def _column(row, bias_ptr, col, qmask):
    """One projection column for a block of queries, float32, with its bias."""
    return tl.load(row + col, mask=qmask, other=0.0).to(tl.float32) + tl.load(bias_ptr + col)


@triton.jit
def _msda_proj_kernel(value_ptr, proj_ptr, bias_ptr, ref_ptr, shapes_ptr, starts_ptr, out_ptr, S, Q,
                      H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                      BLOCK: tl.constexpr):
    # msda_triton's kernel, but reading where and how much straight from the projection:
    # proj B×Q×(H·L·P·3) = [offsets (heads→levels→points→xy, in cells) | logits (heads→
    # levels·points)] without their bias, which is added here in float32 (bias: H·L·P·3); the
    # softmax over each head's L·P logits and the sampling points (reference · size + offset
    # − ½, in pixels) are made here too. ref: Q×L×2 (x, y) in [0, 1].
    n = tl.program_id(0)
    b = n // H
    h = n % H
    q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    qmask = q < Q
    dd = tl.arange(0, D)
    C = H * D
    row = proj_ptr + (b.to(tl.int64) * Q + q) * (H * L * P * 3)
    offs = h * (L * P * 2)  # column of this head's first offset
    logits = H * L * P * 2 + h * (L * P)  # and of its first logit
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for lp in tl.static_range(L * P):
        top = tl.maximum(top, _column(row, bias_ptr, logits + lp, qmask))
    den = tl.zeros((BLOCK,), dtype=tl.float32)
    for lp in tl.static_range(L * P):
        den += tl.exp(_column(row, bias_ptr, logits + lp, qmask) - top)
    vbase = value_ptr + b.to(tl.int64) * S * C + h * D
    acc = tl.zeros((BLOCK, D), dtype=tl.float32)
    for lvl in tl.static_range(L):
        hl = tl.load(shapes_ptr + 2 * lvl)
        wl = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        rx = tl.load(ref_ptr + (q * L + lvl) * 2, mask=qmask, other=0.0)
        ry = tl.load(ref_ptr + (q * L + lvl) * 2 + 1, mask=qmask, other=0.0)
        for p in tl.static_range(P):
            lp = lvl * P + p
            w = tl.exp(_column(row, bias_ptr, logits + lp, qmask) - top) / den
            x = rx * wl + _column(row, bias_ptr, offs + 2 * lp, qmask) - 0.5
            y = ry * hl + _column(row, bias_ptr, offs + 2 * lp + 1, qmask) - 0.5
            acc += _bilinear(vbase, C, start, hl, wl, x, y, qmask, dd) * w[:, None]
    out = out_ptr + (b.to(tl.int64) * Q + q[:, None]) * C + h * D + dd[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None])


def msda_from_projection(value: torch.Tensor, proj: torch.Tensor, bias: torch.Tensor,
                         ref: torch.Tensor, shapes: list[tuple[int, int]], heads: int,
                         points: int) -> torch.Tensor:
    """value: B×S×C; proj: B×Q×(h·L·P·3) (offsets, then logits) less ``bias`` (float32);
    ref: 1×Q×L×2 -> B×Q×C."""
    b, s, c = value.shape
    q, nl = proj.shape[1], len(shapes)
    if proj.shape[-1] != heads * nl * points * 3:
        raise ValueError(f"projection width {proj.shape[-1]} is not {heads}·{nl}·{points}·3")
    meta = _level_table(tuple(shapes), value.device)
    out = torch.empty(b, q, c, dtype=value.dtype, device=value.device)
    with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
        _msda_proj_kernel[(b * heads, triton.cdiv(q, BLOCK_Q))](
            value.contiguous(), proj.contiguous(), bias.float().contiguous(),
            ref[0].float().contiguous(), meta,
            meta[2 * nl:], out, s, q, H=heads, D=c // heads, L=nl, P=points, BLOCK=BLOCK_Q)
    return out


def sampling_projection(attn, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The offset and weight projections as one (rows: offsets, then logits): the weight in
    ``dtype``, the bias in float32 (the kernel adds it), made once per module and dtype."""
    cache = attn.__dict__.setdefault("_sampling_projection", {})
    if dtype not in cache:
        w = torch.cat([attn.sampling_offsets.weight, attn.attention_weights.weight])
        bias = torch.cat([attn.sampling_offsets.bias, attn.attention_weights.bias])
        cache[dtype] = (w.detach().to(dtype), bias.detach().float())
    return cache[dtype]


def fused_encoder(encoder: _Encoder, x, pos, ref, shapes,
                  sampling_in_kernel: bool = False) -> torch.Tensor | None:
    """``_Encoder.forward`` through :func:`add_norm` and the deformable-attention kernel, under
    the autocast in force; None where that kernel cannot run (the eager path then does).
    ``sampling_in_kernel``: the offset and weight projections as one GEMM whose output
    :func:`msda_from_projection` reads (softmax and points made in the kernel)."""
    layers = list(encoder.layers)
    first = layers[0].self_attn
    kernel = fused_kernel(x.shape[-1] // first.num_heads)
    if kernel is None:
        return None
    ct = torch.get_autocast_dtype(x.device.type)
    b, s, _ = x.shape
    x = x.float().contiguous()
    pos = pos.float()
    xc, qc = x.to(ct), (x + pos).to(ct)
    for i, layer in enumerate(layers):
        a = layer.self_attn
        h, nl, npts = a.num_heads, a.num_levels, a.num_points
        if sampling_in_kernel:
            weight, bias = sampling_projection(a, ct)
            proj = torch.matmul(qc, weight.t())  # B×S×(h·L·P·3), no bias
            out = msda_from_projection(a.value_proj(xc), proj, bias, ref, shapes, h, npts)
        else:
            w, points = a.sampling_t(qc.transpose(1, 2), ref, shapes)
            out = kernel(a.value_proj(xc), shapes, points.view(b * h, nl, npts, 2, s), w, h)
        x, xc, _ = add_norm(x, a.output_proj(out), layer.norms[0])
        last = i == len(layers) - 1
        x, xc, qc = add_norm(x, layer.ffn.layers(xc), layer.norms[1], None if last else pos)
    return x


@contextlib.contextmanager
def fused_pixel_encoder(on_call=None, sampling_in_kernel: bool = False):
    """The candidate in place of ``_Encoder.forward`` where it applies (CUDA or the
    interpreter, autocast on, no gradient), for timing it inside the whole model;
    ``on_call(x)`` is told each time it runs."""
    eager = _Encoder.forward

    def forward(self, x, pos, ref, shapes):
        if on_triton(x) and torch.is_autocast_enabled(x.device.type):
            out = fused_encoder(self, x, pos, ref, shapes, sampling_in_kernel)
            if out is not None:
                if on_call is not None:
                    on_call(x)
                return out
        return eager(self, x, pos, ref, shapes)

    _Encoder.forward = forward
    try:
        yield
    finally:
        _Encoder.forward = eager


@contextlib.contextmanager
def _msda_kernel_on_the_cpu(device: str):
    """Eager's deformable attention through the Triton kernel on the CPU too (the
    interpreter), as it runs on CUDA, so that only this candidate's kernels differ."""
    from crossearth_cli.model.ms_deform_attn import MSDeformAttn

    forward = MSDeformAttn.forward
    if device == "cpu":
        MSDeformAttn.forward = lambda self, *args, fused=None: forward(self, *args, fused=True)
    try:
        yield
    finally:
        MSDeformAttn.forward = forward


def check(device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The kernel against the eager ops it replaces (the casts must be exact, the LayerNorm
    may differ in its last bits), then the tiny model's pixel-decoder encoder (two layers) and
    whole-model scores, eager against fused under ``dtype`` autocast."""
    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model.random_init import random_state_dict, tiny_config

    torch.manual_seed(0)
    c = 96  # not a power of two: masked lanes are exercised
    norm = torch.nn.LayerNorm(c, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 7, c, device=device)
    y = torch.randn(2, 7, c, device=device).to(dtype)
    pos = torch.randn(1, 7, c, device=device)
    report: dict = {}
    with torch.inference_mode():
        out, cast, qcast = add_norm(x, y, norm, pos)
        want = F.layer_norm(x + y.float(), (c,), norm.weight, norm.bias, norm.eps)
        report["add_norm"] = {"ln_max_abs_diff": float((out - want).abs().max()),
                              "cast_equal": bool(torch.equal(cast, out.to(dtype))),
                              "pos_cast_equal": bool(torch.equal(qcast, (out + pos).to(dtype)))}

    report["msda_from_projection"] = _check_msda_from_projection(device)

    config = tiny_config(num_classes=6)
    net = CrossEarth(config)
    net.load_state_dict(random_state_dict(config, seed=0))
    net = net.to(device).eval()
    decoder = net.decode_head.pixel_decoder
    with torch.no_grad():  # visible norms: the random init leaves them at 1 and 0
        for layer in decoder.encoder.layers:
            for n in layer.norms:
                n.weight.normal_(1, 0.3)
                n.bias.normal_(0, 0.3)
    d = decoder.feat_channels
    shapes = [(2, 3), (4, 5), (8, 9)]  # small: the interpreter runs each program in Python
    s = sum(hl * wl for hl, wl in shapes)
    # one image: under the interpreter every program runs in Python (batch 2 took 4.5 min
    # on a 2-core AVX2 VM)
    x = torch.randn(1, s, d, device=device)
    pos = torch.randn(1, s, d, device=device)
    ref = torch.rand(1, s, 1, 2, device=device).expand(1, s, len(shapes), 2)
    img = torch.randn(1, 3, 32, 32, device=device)
    with torch.inference_mode():
        exact = decoder.encoder(x, pos, ref, shapes)  # float32: what both bf16 paths approximate

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    for variant, in_kernel in (("", False), ("_sampling_in_kernel", True)):
        calls = []
        with (torch.inference_mode(), torch.autocast(device, dtype=dtype),
              _msda_kernel_on_the_cpu(device)):
            want = decoder.encoder(x, pos, ref, shapes)
            got = fused_encoder(decoder.encoder, x, pos, ref, shapes, in_kernel)
            want_scores = net(img).float()
            with fused_pixel_encoder(on_call=calls.append, sampling_in_kernel=in_kernel):
                got_scores = net(img).float()
        report["encoder" + variant] = {
            "layers": len(decoder.encoder.layers),
            "max_abs_diff": float((want - got).abs().max()),
            "max_rel_diff": rel(got, want),
            "max_rel_diff_vs_float32": rel(got, exact),
            "eager_max_rel_diff_vs_float32": rel(want, exact)}
        report["model" + variant] = {
            "fused_calls": len(calls),
            "scores_max_rel_diff": rel(got_scores, want_scores),
            "class_agreement": float((want_scores.argmax(1) == got_scores.argmax(1))
                                     .float().mean())}
    return report


def _check_msda_from_projection(device: str) -> dict:
    """The projection-reading kernel against the model's PyTorch deformable attention, both
    float32, on a small random layer with points also off the map."""
    from crossearth_cli.model.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dims=64, num_heads=8, num_levels=3, num_points=4).to(device)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(layer.attention_weights.weight, std=0.5)
    shapes = [(2, 3), (4, 5), (8, 9)]
    s = sum(hl * wl for hl, wl in shapes)
    query = torch.randn(2, s, 64, device=device)
    pos = torch.randn(1, s, 64, device=device)
    ref = torch.rand(1, s, 3, 2, device=device)  # a different point on each level
    with torch.no_grad():
        want = layer(query, pos, ref, shapes, fused=False)
        weight, bias = sampling_projection(layer, torch.float32)
        proj = torch.matmul(query + pos, weight.t())
        out = msda_from_projection(layer.value_proj(query), proj, bias, ref, shapes, 8, 4)
        got = query + layer.output_proj(out)
    return {"max_abs_diff": float((want - got).abs().max())}


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    exact = interpreter_rounds_to_nearest() if dev == "cpu" else contextlib.nullcontext()
    with exact:
        print(json.dumps(check(dev)))
