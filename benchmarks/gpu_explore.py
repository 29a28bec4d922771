"""Where a ViT-L CrossEarth forward spends its GPU time, and what each change buys.

One run, so every figure comes from the same card and can be compared as a ratio:
- the card's own bf16 matmul rate (the peak the % figures use beside the data-sheet one);
- model-only tiles/s at 512² and 1024² for the model as it ran before this issue's GPU
  changes (``before``), as it runs now (``now``: fused Triton deformable attention, the ViT's
  element-wise passes and the semantic inference fused in Triton kernels, the patch embedding
  as one GEMM, weights stored in bf16 for autocast, mask resizes by slicing), and now with one
  change undone at a time, each with its class-map agreement and largest score difference
  against ``before``, and the fused kernels' exactness checks on this GPU;
- component times (backbone, pixel decoder, its deformable attention alone, transformer
  decoder, semantic inference) and the top kernels and ops of one batch, with how busy the
  GPU was (kernel time / wall time: low means launch-bound);
- batch sizes, with ``--e2e-size`` `segment` end to end, now and before, and regional
  ``torch.compile`` of the eager blocks (``candidates.py``);
- candidates not yet in the model: CUDA graphs (in the package, opt-in), the whole model
  compiled, the fused pixel-decoder encoder (``fused_pixel.py``).
The first H100 run used the earlier form of this script, which timed the changes as patches
(its JSON: docs/results/gpu-h100-explore-run1.json).

    python benchmarks/gpu_explore.py --json $OUT/explore.json
    python benchmarks/gpu_explore.py --only '512_(now|before)$|fused' --json $OUT/explore.json
    bash benchmarks/gpu_session.sh   # the fused paths, then gpu.sh, in one command
    python benchmarks/gpu_explore.py --cpu-smoke --json /tmp/explore.json   # tiny, on the CPU
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from bench_gpu import (
    StepLog,
    applied,
    before_gpu_changes,
    cuda_graphs,
    cudnn_attention,
    end_to_end,
    folder_of_tiles,
    interpolated_mask_resizes,
    masks_resized_per_layer,
    patch_convolution,
    pytorch_attention,
)
from candidates import head_compile, regional_compile
from fused_pixel import check as check_fused_pixel
from fused_pixel import fused_pixel_encoder
from scenes import (
    TFLOP_PER_TILE,
    class_agreement,
    machine,
    matmul_tflops,
    random_model,
    sync,
    work_dir,
)

from crossearth_cli.cuda_graphs import GraphedForward
from crossearth_cli.model.backbone import FUSED_VIT
from crossearth_cli.model.head import FUSED_SEMANTIC
from crossearth_cli.model.precision import autocast_weights
from crossearth_cli.model.semantic_triton import check as check_fused_semantic
from crossearth_cli.model.vit_triton import check_kernels

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM


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


def autocast(dev: str):
    return torch.autocast(dev, dtype=torch.bfloat16)


# --- measurements -----------------------------------------------------------------------------


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    return {"class_agreement": round((ref.argmax(1) == out.float().argmax(1)).float().mean()
                                     .item(), 5),
            "max_abs_diff": float((ref - out.float()).abs().max())}


def variant_row(net, x, dev, seconds, ref, *, patches=(), ref_now=None) -> dict:
    """bf16 tiles/s of ``net`` with ``patches`` applied, compared with ``ref`` (before) and
    ``ref_now``."""
    with applied(patches), torch.inference_mode(), autocast(dev):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = ms_per_call(lambda: net(x), dev, seconds)
        out = net(x)
    row = {"batch": x.shape[0], "ms_per_batch": round(ms, 2),
           "tiles_per_s": round(x.shape[0] / ms * 1000, 2)}
    if x.shape[-1] in TFLOP_PER_TILE and dev == "cuda":
        row["tflop_s"] = round(row["tiles_per_s"] * TFLOP_PER_TILE[x.shape[-1]], 1)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if ref is not None and ref.shape == out.shape:
        row.update(compare(ref, out))
    if ref_now is not None:
        row.update({f"{k}_vs_now": v for k, v in compare(ref_now, out).items()})
    if isinstance(net, GraphedForward):  # a failed capture runs eagerly: say so
        row["graph_captures"] = net.captures
        if net.failed:
            row["graphs_failed"] = net.failed
    return row


def compiled_row(compiled, x, dev, seconds, ref_now, patches=()) -> dict:
    """A ``torch.compile``-d model (compiled at its first call) with ``patches`` applied:
    compile time (the first call), then tiles/s."""
    t0 = time.perf_counter()
    with applied(patches), torch.inference_mode(), autocast(dev):
        compiled(x)
        sync(dev)
    compile_s = time.perf_counter() - t0
    row = variant_row(compiled, x, dev, seconds, None, patches=patches, ref_now=ref_now)
    row["compile_and_first_call_s"] = round(compile_s, 1)
    return row


def components(net, x, dev, seconds, patches=()) -> dict:
    from crossearth_cli.model.backbone import FEATURE_SCALES
    from crossearth_cli.model.head import semantic_scores

    head = net.decode_head
    size = tuple(x.shape[-2:])
    captured = {}

    def grab(module, args):
        captured.setdefault("msda", args)

    with applied(patches), torch.inference_mode(), autocast(dev):
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
    with applied(patches), torch.inference_mode(), autocast(dev):
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


def shrink_check(dev: str) -> dict:
    """shrink_bilinear against F.interpolate on this device, for the decoder's sizes."""
    import torch.nn.functional as F

    from crossearth_cli.model.head import shrink_bilinear

    x = torch.randn(16, 100, 128, 128, device=dev, dtype=torch.bfloat16) * 4
    out = {}
    for size in ((64, 64), (32, 32), (16, 16)):
        want = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
        got = shrink_bilinear(x, size)
        out[f"{size[0]}"] = {"equal": bool(torch.equal(want, got)),
                             "max_abs_diff": float((want - got).abs().max())}
    return out


def end_to_end_kept(net, e2e: int, dev: str, batch: int, work: Path, tile: int,
                    patches=()) -> dict:
    """``segment`` end to end (bench_gpu.end_to_end) with ``patches`` applied; its class map is
    kept, and compared with the one a run without patches kept before it."""
    with applied(patches):
        row = end_to_end(net, e2e, dev, batch, "bf16", work, tile)
    kept = work / ("classes_patched.tif" if patches else "classes_now.tif")
    (work / "classes.tif").replace(kept)
    if patches and (work / "classes_now.tif").exists():
        row["class_agreement_vs_now"] = round(class_agreement(kept, work / "classes_now.tif"), 5)
    return row


def _folder(net, files: int, size: int, dev: str, batch: int, work: Path, patches) -> dict:
    with applied(patches):
        return folder_of_tiles(net, files, size, dev, batch, work, profile=True)


def explore_size(step, size: int, batches: tuple[int, ...], dev: str, seconds: float,
                 full: bool = True, e2e: int | None = None) -> None:
    """Before / now at ``size`` and ``batches[0]``; if ``full`` also now with one change undone,
    the candidates, components, profile and the other batch sizes; with ``e2e`` end-to-end
    runs on an e2e² scene, now and with every candidate."""
    net = random_model(dev == "cpu", size, dev)
    now = autocast_weights(net, torch.bfloat16)  # as segment prepares it
    torch.manual_seed(1)
    x = torch.randn(batches[0], 3, size, size, device=dev)
    with torch.inference_mode(), autocast(dev), before_gpu_changes():
        ref = net(x).float()
    variants = {
        "before": (net, (before_gpu_changes,)),
        "now": (now, ()),
        "now_but_pytorch_attention": (now, (pytorch_attention,)),
        "now_but_interpolated_masks": (now, (interpolated_mask_resizes,
                                              masks_resized_per_layer)),
        "now_but_masks_resized_per_layer": (now, (masks_resized_per_layer,)),
        "now_but_weights_cast_per_call": (net, ()),
        "now_but_eager_vit": (now, (FUSED_VIT.switched_off,)),  # vit_triton's fused passes off
        "now_but_eager_semantic": (now, (FUSED_SEMANTIC.switched_off,)),
        "now_but_patch_convolution": (now, (patch_convolution,)),
        "now_plus_fused_pixel_encoder": (now, (fused_pixel_encoder,)),  # candidates
        "now_plus_fused_pixel_encoder_sampling_in_kernel": (
            now, (functools.partial(fused_pixel_encoder, sampling_in_kernel=True),)),
        "now_plus_cudnn_attention": (now, (cudnn_attention,)),
    }
    with torch.inference_mode(), autocast(dev):
        ref_now = now(x).float()
    for name, (model, patches) in variants.items():
        if not full and name.startswith(("now_but", "now_plus")):
            continue
        step(f"model_{size}_{name}", lambda m=model, p=patches, n=name: variant_row(
            m, x, dev, seconds, ref, patches=p, ref_now=ref_now if n != "now" else None))
    if not full:
        return
    if e2e is not None:  # before the regional compile, which may take long
        work = work_dir("crossearth-explore-")
        step("end_to_end_now", lambda: end_to_end_kept(net, e2e, dev, batches[0], work, size))
        step("end_to_end_before", lambda: end_to_end_kept(
            net, e2e, dev, batches[0], work, size, patches=(before_gpu_changes,)))
        step("end_to_end_cuda_graphs", lambda: end_to_end_kept(
            net, e2e, dev, batches[0], work, size, patches=(cuda_graphs,)))
        files = 128 if dev == "cuda" else 4
        for name, patches in (("now", ()), ("cuda_graphs", (cuda_graphs,))):
            step(f"folder_of_tiles_{name}", lambda p=patches: _folder(net, files, size, dev,
                                                                      batches[0], work, p))
    if dev == "cuda":  # each forward replayed from a CUDA graph: against now, at two batches
        step(f"model_{size}_now_cuda_graphs", lambda: variant_row(
            GraphedForward(now), x, dev, seconds, ref, ref_now=ref_now))
        step(f"model_{size}_now_b1", lambda: variant_row(now, x[:1], dev, seconds, None))
        step(f"model_{size}_now_cuda_graphs_b1", lambda: variant_row(
            GraphedForward(now), x[:1], dev, seconds, None, ref_now=ref_now[:1]))
        # host time per forward (~40 ms of launches in eager mode on the H200) hides GPU
        # savings once a batch of 16 takes less: the best eager candidates are timed where
        # it cannot, replayed from CUDA graphs and at batch 64 (what --batch-size auto picks
        # on an H200), beside now at batch 64
        def best_row(net, xb, reference):
            calls: list = []  # the fused encoder's calls: it falls back to eager silently
            best = functools.partial(fused_pixel_encoder, sampling_in_kernel=True,
                                     on_call=lambda _x: calls.append(1))
            row = variant_row(net, xb, dev, seconds, reference, patches=(best,),
                              ref_now=ref_now if xb is x else None)
            row["fused_encoder_calls"] = len(calls)
            return row

        step(f"model_{size}_now_plus_best_cuda_graphs",
             lambda: best_row(GraphedForward(now), x, ref))
        step(f"model_{size}_now_plus_cudnn_attention_cuda_graphs", lambda: variant_row(
            GraphedForward(now), x, dev, seconds, ref, patches=(cudnn_attention,),
            ref_now=ref_now))
        x64 = torch.randn(64, *x.shape[1:], device=dev)
        step(f"model_{size}_now_b64", lambda: variant_row(now, x64, dev, seconds, None))
        step(f"model_{size}_now_plus_best_b64", lambda: best_row(now, x64, None))
        del x64
        # the head alone through inductor (the backbone keeps its fused kernels), then the
        # whole model (one graph now: no Rein graph breaks), each also replayed from CUDA
        # graphs (no second compilation)
        head_compiled = head_compile(now)
        step(f"model_{size}_now_compiled_head", lambda: compiled_row(
            head_compiled, x, dev, seconds, ref_now), needs=40)
        step(f"model_{size}_now_compiled_head_cuda_graphs", lambda: variant_row(
            GraphedForward(head_compiled), x, dev, seconds, None, ref_now=ref_now))
        compiled = torch.compile(now, dynamic=False)
        step(f"model_{size}_now_compiled", lambda: compiled_row(compiled, x, dev, seconds,
                                                                 ref_now), needs=90)
        step(f"model_{size}_now_compiled_cuda_graphs", lambda: variant_row(
            GraphedForward(compiled), x, dev, seconds, None, ref_now=ref_now))
    if dev == "cuda":  # inductor on the CPU is slow to compile and not what this is for
        step(f"model_{size}_now_but_eager_vit_regional_compile",  # compiled eager blocks
             lambda: compiled_row(regional_compile(now), x, dev, seconds, ref_now,
                                  patches=(FUSED_VIT.switched_off,)))
    step(f"components_{size}_now", lambda: components(now, x, dev, seconds))
    step(f"profile_{size}_now", lambda: kernel_profile(now, x, dev))
    for b in batches[1:]:
        xb = torch.randn(b, 3, size, size, device=dev)
        step(f"model_{size}_now_b{b}", lambda xb=xb: variant_row(now, xb, dev, seconds, None))
        del xb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=300, help="seconds; later steps skipped")
    ap.add_argument("--seconds", type=float, default=2.5, help="per timing")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="run only the steps whose names this finds, e.g. 'now$|fused'")
    ap.add_argument("--e2e-size", type=int, default=None,
                    help="also segment a synthetic scene of this size (gpu.sh does 16384)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    seconds = 0.1 if smoke else args.seconds
    report: dict = {"benchmark": "gpu explore", "machine": machine(), "torch": torch.__version__}
    if not smoke:  # fp32 as `--precision fp32` runs it: torch's defaults (no TF32 matmuls)
        report["gpu"] = name = torch.cuda.get_device_name(0)
        report["datasheet_bf16_tflops"] = next(
            (v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    step = StepLog(report, args.json, args.budget, args.only)

    if not smoke:
        step("matmul_bf16_8192_tflops", lambda: round(matmul_tflops(dev, torch.bfloat16, 8192), 1))
        step("shrink_bilinear_equals_interpolate", lambda: shrink_check(dev))
        step("fused_elementwise_kernels_vs_eager", lambda: check_kernels(dev))
        step("fused_semantic_vs_eager", lambda: check_fused_semantic(dev))
        step("fused_pixel_encoder_vs_eager", lambda: check_fused_pixel(dev))
    if smoke:
        explore_size(step, 64, (2, 4), dev, seconds, e2e=128)
        explore_size(step, 128, (1,), dev, seconds, full=False)
    else:  # gpu.sh times the end-to-end run
        explore_size(step, 512, (16, 4, 32), dev, seconds, e2e=args.e2e_size)
        if step.selects("model_1024_before", "model_1024_now"):  # building it takes a while
            explore_size(step, 1024, (4,), dev, seconds, full=False)
    step.finish()


if __name__ == "__main__":
    main()
