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
import triton
import triton.language as tl
from scenes import ROOT  # noqa: F401 - puts this checkout on sys.path

from crossearth_cli.model.ms_deform_attn import fused_kernel
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


def fused_encoder(encoder: _Encoder, x, pos, ref, shapes) -> torch.Tensor | None:
    """``_Encoder.forward`` through :func:`add_norm` and the deformable-attention kernel, under
    the autocast in force; None where that kernel cannot run (the eager path then does)."""
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
        w, points = a.sampling_t(qc.transpose(1, 2), ref, shapes)
        out = kernel(a.value_proj(xc), shapes, points.view(b * h, nl, npts, 2, s), w, h)
        x, xc, _ = add_norm(x, a.output_proj(out), layer.norms[0])
        last = i == len(layers) - 1
        x, xc, qc = add_norm(x, layer.ffn.layers(xc), layer.norms[1], None if last else pos)
    return x


@contextlib.contextmanager
def fused_pixel_encoder(on_call=None):
    """The candidate in place of ``_Encoder.forward`` where it applies (CUDA or the
    interpreter, autocast on, no gradient), for timing it inside the whole model;
    ``on_call(x)`` is told each time it runs."""
    eager = _Encoder.forward

    def forward(self, x, pos, ref, shapes):
        if on_triton(x) and torch.is_autocast_enabled(x.device.type):
            out = fused_encoder(self, x, pos, ref, shapes)
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
    import torch.nn.functional as F

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
    x = torch.randn(2, s, d, device=device)
    pos = torch.randn(1, s, d, device=device)
    ref = torch.rand(1, s, 1, 2, device=device).expand(1, s, len(shapes), 2)
    img = torch.randn(2, 3, 64, 64, device=device)
    calls = []
    with (torch.inference_mode(), torch.autocast(device, dtype=dtype),
          _msda_kernel_on_the_cpu(device)):
        want = decoder.encoder(x, pos, ref, shapes)
        got = fused_encoder(decoder.encoder, x, pos, ref, shapes)
        want_scores = net(img).float()
        with fused_pixel_encoder(on_call=calls.append):
            got_scores = net(img).float()
    report["encoder"] = {"layers": len(decoder.encoder.layers),
                         "max_abs_diff": float((want - got).abs().max()),
                         "max_rel_diff": float((want - got).abs().max() / want.abs().max())}
    report["model"] = {"fused_calls": len(calls),
                       "scores_max_rel_diff": float((want_scores - got_scores).abs().max()
                                                    / want_scores.abs().max()),
                       "class_agreement": float((want_scores.argmax(1) == got_scores.argmax(1))
                                                .float().mean())}
    return report


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    exact = interpreter_rounds_to_nearest() if dev == "cpu" else contextlib.nullcontext()
    with exact:
        print(json.dumps(check(dev)))
