"""Two questions the first H200 run (2026-11-27) left, in one short GPU command.

1. **Are the fused candidates as faithful as autocast?** ``vit_triton.py``'s kernels matched
   eager bit for bit one by one, yet the whole model's classes agreed with ``now`` on only
   99.5 % of pixels (random weights make near-ties everywhere, so any rounding change shows).
   The fair test is against the model in float32 (TF32 off): class agreement and relative
   score error of ``now`` (bf16 autocast, what ships) and of each candidate. A candidate no
   further from float32 than ``now`` is as faithful as the default bf16 path.
2. **What caps `segment` end to end at ~185 tiles/s?** With the candidates the model ran 308
   tiles/s alone, but `segment` did not move (172.9 against 170.7 tiles/s on 8192²). Timed
   here on one 8192² scene: the zero-cost model (the pipeline alone on this machine), ViT-L
   now and with the candidates, more reader threads, no compression, and the main thread's
   cProfile (where the thread that launches the GPU work spends its time).

    python benchmarks/gpu_diagnose.py --json $OUT/diagnose.json
    python benchmarks/gpu_diagnose.py --cpu-smoke            # tiny model, CPU, in the tests
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_gpu import StepLog, applied, before_gpu_changes, patch_convolution
from scenes import ZeroCostHead, machine, profiled, random_model, work_dir, write_scene

from crossearth_cli.model.backbone import FUSED_VIT
from crossearth_cli.model.head import FUSED_SEMANTIC
from crossearth_cli.model.precision import autocast_weights

CANDIDATES = {  # `now` with one fused path switched off at a time, and all of them
    "now": (),
    "eager_vit": (FUSED_VIT.switched_off,),
    "eager_semantic": (FUSED_SEMANTIC.switched_off,),
    "patch_convolution": (patch_convolution,),
    "before": (before_gpu_changes,),
}


def faithfulness(net, now, dev: str, batch: int, size: int) -> dict:
    """Each variant's bf16 output against the float32 model (TF32 off) on fresh inputs."""
    torch.manual_seed(7)
    x = torch.rand(batch, 3, size, size, device=dev) * 4 - 2
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref = net(x).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    ref_cls = ref.argmax(1)
    out = {}
    for name, patches in CANDIDATES.items():
        with applied(patches), torch.inference_mode(), torch.autocast(dev, torch.bfloat16):
            y = now(x).double()
        out[name] = {
            "class_agreement_vs_fp32": round((y.argmax(1) == ref_cls).double().mean().item(), 5),
            "rel_error_vs_fp32": float((y - ref).norm() / ref.norm()),
        }
    return out


def segment_row(module, src: Path, work: Path, dev: str, batch: int, tile: int, patches=(),
                **settings):
    from crossearth_cli.engine import ModelSpec, SegmentSettings, segment

    classes = getattr(module, "num_classes", 6)
    spec = ModelSpec(module=module, class_names=[f"c{i}" for i in range(classes)],
                     crop=tile, stride=round(tile * 2 / 3), label="diagnose")
    with applied(patches):
        t0 = time.perf_counter()
        r = segment(SegmentSettings(input=src, output=work / "classes.tif", overwrite=True,
                                    batch_size=batch, device=dev, precision="bf16", **settings),
                    spec)
        seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "tiles": r.tiles,
            "tiles_per_s": round(r.tiles / seconds, 1), "mpx_per_s": round(r.mpx_per_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=150)
    ap.add_argument("--size", type=int, default=8192)
    args = ap.parse_args()
    smoke = args.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    size, tile, batch = (128, 64, 2) if smoke else (args.size, 512, 16)
    report: dict = {"benchmark": "gpu diagnose", "machine": machine(), "torch": torch.__version__}
    step = StepLog(report, args.json, args.budget)
    net = random_model(smoke, tile, dev)
    now = autocast_weights(net, torch.bfloat16) if not smoke else net
    step("faithfulness", lambda: faithfulness(net, now, dev, 2 if smoke else 8, tile))

    work = work_dir("crossearth-diagnose-")
    src = write_scene(work / "scene.tif", size)
    step("segment_zero_cost", lambda: segment_row(ZeroCostHead(6), src, work, dev, batch, tile))
    step("segment_now", lambda: segment_row(net, src, work, dev, batch, tile))
    step("segment_before", lambda: segment_row(net, src, work, dev, batch, tile,
                                               patches=CANDIDATES["before"]))
    step("segment_now_io_threads_8", lambda: segment_row(net, src, work, dev, batch, tile,
                                                          io_threads=8))
    step("segment_now_no_compression", lambda: segment_row(net, src, work, dev, batch, tile,
                                                            compress="none"))
    step("segment_zero_cost_no_compression", lambda: segment_row(
        ZeroCostHead(6), src, work, dev, batch, tile, compress="none"))
    step("segment_now_profiled", lambda: profiled(lambda: segment_row(net, src, work, dev,
                                                                      batch, tile)))
    step("segment_zero_cost_profiled", lambda: profiled(
        lambda: segment_row(ZeroCostHead(6), src, work, dev, batch, tile)))
    step.finish()


if __name__ == "__main__":
    main()
