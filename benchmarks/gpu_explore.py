"""Where a ViT-L CrossEarth forward spends its GPU time, and what each candidate change buys.

One run, so every figure comes from the same card and can be compared as a ratio:
- the card's own bf16 matmul rate (the peak the % figures use beside the data-sheet one);
- component times (backbone, pixel decoder, its deformable attention alone, transformer
  decoder, semantic inference) and the top kernels and ops of one batch, with how busy the
  GPU was (kernel time / wall time: low means launch-bound);
- model-only tiles/s at 512² (and 1024²) for variants, each with its class-map agreement and
  largest score difference against the default path:
  ``fused`` (the Triton deformable attention of ``msda_triton.py``), ``precast`` (the weights
  that autocast would cast anyway stored in bf16: same numbers, fewer copies), ``all_bf16`` (every
  weight and the input in bf16, autocast still on: not the same numbers), ``reinmm`` (the
  Rein attention, head width 1024, as two GEMMs instead of SDPA), and batch sizes;
- end to end on a 16k² scene, default path and best variant.

    python benchmarks/gpu_explore.py --json $OUT/explore.json
    python benchmarks/gpu_explore.py --cpu-smoke --json /tmp/explore.json   # tiny, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_gpu import TFLOP_PER_TILE, build, end_to_end
from scenes import machine
from torch import nn

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def ms_per_call(fn, dev: str, seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        if n % 4 == 0:
            sync(dev)
    sync(dev)
    return (time.perf_counter() - t0) / n * 1000


def autocast(dev: str, enabled: bool = True):
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=enabled)


# --- variants ---------------------------------------------------------------------------------


def precast(net: nn.Module, dtype=torch.bfloat16) -> nn.Module:
    """A copy whose Linear/Conv weights that only ever meet autocast's lowered ops are stored
    in ``dtype`` (autocast would cast them to it anyway). Kept float32: the deformable
    attention's projections (scaled elementwise first) and the Rein's image-independent part
    (computed without autocast)."""
    from crossearth_cli.model.ms_deform_attn import MSDeformAttn
    from crossearth_cli.model.reins import LoRAReins
    from crossearth_cli.model.transformer_decoder import _Projections

    net = copy.deepcopy(net)
    keep = set()
    for m in net.modules():
        if isinstance(m, MSDeformAttn):
            keep |= {id(p) for p in m.parameters()}
        if isinstance(m, LoRAReins):
            keep |= {id(p) for n, p in m.named_parameters() if not n.startswith("mlp_delta_f")}
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, _Projections)):
            for p in m.parameters(recurse=False):
                if id(p) not in keep:
                    p.data = p.data.to(dtype)
    return net


@contextlib.contextmanager
def fused_msda():
    import msda_triton

    from crossearth_cli.model.ms_deform_attn import MSDeformAttn

    original = MSDeformAttn.forward
    msda_triton.install()
    try:
        yield
    finally:
        MSDeformAttn.forward = original


def _rein_two_gemms(self, x, layer, static=None):
    """LoRAReins.forward with the attention as matmul → softmax (float32) → matmul."""
    static = static if static is not None else self.static()
    cls_tok, f = x[:, :1], x[:, 1:]
    dev = f.device.type
    ct = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else f.dtype
    logits = torch.matmul(f.to(ct), static.tokens[layer].to(ct).t())  # B×N×T, one GEMM
    attn = (logits.float() * self.embed_dims**-0.5).softmax(-1).to(ct)
    delta = torch.matmul(attn, static.values[layer].to(ct))  # B×N×C
    delta = self.mlp_delta_f(delta + f)
    f = f + self.scale * delta
    return torch.cat([cls_tok.to(f.dtype), f], dim=1)


@contextlib.contextmanager
def rein_two_gemms():
    from crossearth_cli.model.reins import LoRAReins

    original = LoRAReins.forward
    LoRAReins.forward = _rein_two_gemms
    try:
        yield
    finally:
        LoRAReins.forward = original


# --- measurements -----------------------------------------------------------------------------


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    return {"class_agreement": round((ref.argmax(1) == out.float().argmax(1)).float().mean()
                                     .item(), 5),
            "max_abs_diff": float((ref - out.float()).abs().max())}


def variant_row(net, x, dev, seconds, ref, *, amp=True, patches=(), dtype=None) -> dict:
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p())
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(dev, amp))
        xin = x.to(dtype) if dtype is not None else x
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = ms_per_call(lambda: net(xin), dev, seconds)
        out = net(xin)
    row = {"batch": x.shape[0], "ms_per_batch": round(ms, 2),
           "tiles_per_s": round(x.shape[0] / ms * 1000, 2)}
    if x.shape[-1] in TFLOP_PER_TILE and dev == "cuda":
        row["tflop_s"] = round(row["tiles_per_s"] * TFLOP_PER_TILE[x.shape[-1]], 1)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if ref is not None and ref.shape == out.shape:
        row.update(compare(ref, out))
    return row


def components(net, x, dev, seconds, patches=()) -> dict:
    from crossearth_cli.model.backbone import FEATURE_SCALES
    from crossearth_cli.model.head import semantic_scores

    head = net.decode_head
    size = tuple(x.shape[-2:])
    captured = {}

    def grab(module, args):
        captured.setdefault("msda", args)

    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p())
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(dev))
        hook = head.pixel_decoder.encoder.layers[0].self_attn.register_forward_pre_hook(grab)
        try:
            maps, queries = net.backbone.forward_maps(x)
            cls, masks = head(maps, queries, FEATURE_SCALES)
        finally:
            hook.remove()
        attn = head.pixel_decoder.encoder.layers[0].self_attn
        layers = len(head.pixel_decoder.encoder.layers)
        t = {
            "total": ms_per_call(lambda: net(x), dev, seconds),
            "backbone (ViT + Rein)": ms_per_call(lambda: net.backbone.forward_maps(x), dev,
                                                 seconds),
            "pixel decoder": ms_per_call(lambda: head.pixel_decoder(maps, FEATURE_SCALES), dev,
                                         seconds),
            "deformable attention (all layers)": layers * ms_per_call(
                lambda: attn(*captured["msda"]), dev, seconds),
            "pixel decoder + transformer decoder + masks": ms_per_call(
                lambda: head(maps, queries, FEATURE_SCALES), dev, seconds),
            "semantic inference": ms_per_call(lambda: semantic_scores(cls, masks, size=size),
                                              dev, seconds),
        }
    return {k: round(v, 2) for k, v in t.items()}


def kernel_profile(net, x, dev, patches=(), top: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p())
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(dev))
        net(x)
        sync(dev)
        t0 = time.perf_counter()
        with profile(activities=acts, record_shapes=True) as prof:
            net(x)
            sync(dev)
        wall_ms = (time.perf_counter() - t0) * 1000

    def dev_self(e) -> float:
        if dev == "cuda":
            return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] \
        if dev == "cuda" else []
    busy = sum(dev_self(e) for e in kernels) / 1000
    out = {"wall_ms_profiled": round(wall_ms, 1), "kernel_ms": round(busy, 1),
           "kernels_launched": sum(e.count for e in kernels),
           "top_kernels": [{"name": e.key[:100], "ms": round(dev_self(e) / 1000, 2),
                            "calls": e.count}
                           for e in sorted(kernels, key=dev_self, reverse=True)[:top]]}
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    out["top_ops"] = [{"op": e.key, "ms": round(dev_self(e) / 1000, 2), "calls": e.count}
                      for e in sorted(ops, key=dev_self, reverse=True)[:top]]
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.device_type == torch.autograd.DeviceType.CPU]
    out["top_ops_by_shape"] = [
        {"op": e.key, "shapes": str(e.input_shapes)[:160], "ms": round(dev_self(e) / 1000, 2),
         "calls": e.count}
        for e in sorted(by_shape, key=dev_self, reverse=True)[:top]]
    return out


def sdpa_backends(dev: str) -> dict:
    """Which SDPA kernels accept the Rein's attention (head width 1024, 100 keys)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(16, 1, 1024, 1024, device=dev, dtype=torch.bfloat16)
    k = torch.randn(16, 1, 100, 1024, device=dev, dtype=torch.bfloat16)
    res = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                ms = ms_per_call(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, k), dev, 0.3)
            res[backend.name] = round(ms, 3)
        except Exception as exc:  # noqa: BLE001 - reported
            res[backend.name] = f"no: {str(exc).splitlines()[0][:80]}"
    res["default"] = round(ms_per_call(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k), dev, 0.3), 3)
    return res


def matmul_peak(dev: str) -> float:
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = ms_per_call(lambda: a @ b, dev, 1.0, warmup=3)
    return round(2 * n**3 / ms / 1e9, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=300, help="seconds; later steps skipped")
    ap.add_argument("--seconds", type=float, default=2.5, help="per timing")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    seconds = 0.1 if smoke else args.seconds
    t_start = time.perf_counter()
    report: dict = {"benchmark": "gpu explore", "machine": machine(), "torch": torch.__version__,
                    "steps": {}, "errors": {}, "step_seconds": {}}
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        report["gpu"] = name = torch.cuda.get_device_name(0)
        report["datasheet_bf16_tflops"] = next(
            (v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    def step(name: str, fn):
        if time.perf_counter() - t_start > args.budget:
            report["errors"][name] = "skipped: out of time budget"
            save()
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
            out = None
        else:
            report["steps"][name] = out
        report["step_seconds"][name] = round(time.perf_counter() - t0, 1)
        save()
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {json.dumps(out)}", flush=True)
        return out

    if not smoke:
        step("matmul_bf16_8192_tflops", lambda: matmul_peak(dev))
        step("sdpa_backends_rein", lambda: sdpa_backends(dev))
    size = 64 if smoke else 512
    b = 2 if smoke else 16
    net = build(smoke, size, dev)
    pre = precast(net)
    torch.manual_seed(1)
    x = torch.randn(b, 3, size, size, device=dev)
    with torch.inference_mode(), autocast(dev):
        ref = net(x).float()
    with torch.inference_mode(), autocast(dev, False):
        report["steps"]["fp32_vs_bf16_default"] = compare(net(x).float(), ref)

    variants = {  # name -> (model, patches, autocast, input dtype)
        "default": (net, (), True, None),
        "fused": (net, (fused_msda,), True, None),
        "precast": (pre, (), True, None),
        "precast_fused": (pre, (fused_msda,), True, None),
        "precast_fused_reinmm": (pre, (fused_msda, rein_two_gemms), True, None),
    }
    for name, (model, patches, amp, dtype) in variants.items():
        if smoke and patches:  # Triton's interpreter takes seconds per call: checked elsewhere
            continue
        step(f"model_{size}_{name}", lambda m=model, p=patches, a=amp, d=dtype:
             variant_row(m, x, dev, seconds, ref, amp=a, patches=p, dtype=d))
    step(f"components_{size}_default", lambda: components(net, x, dev, seconds))
    step(f"profile_{size}_default", lambda: kernel_profile(net, x, dev))
    fused = () if smoke else (fused_msda,)
    step(f"components_{size}_precast_fused", lambda: components(pre, x, dev, seconds, fused))
    step(f"profile_{size}_precast_fused", lambda: kernel_profile(pre, x, dev, fused))
    for bb in ((4,) if smoke else (32, 64)):
        xb = torch.randn(bb, 3, size, size, device=dev)
        step(f"model_{size}_default_b{bb}",
             lambda xb=xb: variant_row(net, xb, dev, seconds, None))
        step(f"model_{size}_precast_fused_b{bb}",
             lambda xb=xb: variant_row(pre, xb, dev, seconds, None, patches=fused))
        del xb
    pure = copy.deepcopy(net).to(torch.bfloat16)
    step(f"model_{size}_all_bf16_fused", lambda m=pure: variant_row(  # all weights bf16, amp on
        m, x, dev, seconds, ref, patches=fused, dtype=torch.bfloat16))
    del pure

    e2e_size = 128 if smoke else 16384
    work = Path(tempfile.mkdtemp(prefix="crossearth-explore-"))
    step("end_to_end_default", lambda: end_to_end(net, e2e_size, dev, b, "bf16", work, size))
    with fused_msda() if fused else contextlib.nullcontext():
        step("end_to_end_precast_fused",
             lambda: end_to_end(pre, e2e_size, dev, b, "bf16", work, size))
    del pre, net
    if not smoke:
        torch.cuda.empty_cache()

    big = 128 if smoke else 1024
    bb = 1 if smoke else 4
    net = build(smoke, big, dev)
    pre = precast(net)
    xb = torch.randn(bb, 3, big, big, device=dev)
    with torch.inference_mode(), autocast(dev):
        ref = net(xb).float()
    step(f"model_{big}_default", lambda: variant_row(net, xb, dev, seconds, ref))
    step(f"model_{big}_precast_fused",
         lambda: variant_row(pre, xb, dev, seconds, ref, patches=fused))
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=2))


if __name__ == "__main__":
    main()
