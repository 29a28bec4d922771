"""Where a ViT-L CrossEarth forward spends its GPU time: components and top kernels.

    python benchmarks/profile_gpu.py --json $OUT/profile.json [--batch 16] [--size 512]

Times the backbone (ViT + Rein), the pixel decoder, the transformer decoder with its mask
heads, and mmseg's semantic inference separately with CUDA events under bf16 autocast, lists
the 20 kernels with the most GPU time, and compares a pure-bf16 model (weights cast, no
autocast) with autocast for speed and agreement of the class maps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_gpu import build
from scenes import machine


def cuda_ms(fn, repeats: int = 5) -> tuple[float, object]:
    out = fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, out


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from crossearth_cli.model.head import semantic_scores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    net = build(False, args.size, "cuda")
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    head = net.decode_head
    report: dict = {"machine": machine(), "batch": args.batch, "size": args.size}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        t_total, scores = cuda_ms(lambda: net(x))
        t_bb, (feats, queries) = cuda_ms(lambda: net.backbone(x))
        t_pd, _ = cuda_ms(lambda: head.pixel_decoder(feats))
        t_head, (cls, masks) = cuda_ms(lambda: head(feats, queries))
        t_sem, _ = cuda_ms(lambda: semantic_scores(cls, masks, size=(args.size, args.size)))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            net(x)
            torch.cuda.synchronize()
    report["ms_per_batch"] = {
        "total": round(t_total, 2), "backbone (ViT + Rein)": round(t_bb, 2),
        "pixel decoder": round(t_pd, 2),
        "transformer decoder + mask heads": round(t_head - t_pd, 2),
        "semantic inference": round(t_sem, 2),
    }
    report["tiles_per_s"] = round(args.batch / t_total * 1000, 2)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        rows.append((t, e.key, e.count))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1
    report["top_kernels"] = [
        {"name": k[:90], "ms": round(t / 1000, 2), "share": round(t / total, 3), "calls": n}
        for t, k, n in rows[:20]
    ]
    # pure bf16 weights, no autocast: fewer casts, bf16 norms and softmaxes
    t0 = time.perf_counter()
    pure = net.to(torch.bfloat16)
    with torch.inference_mode():
        t_pure, pure_scores = cuda_ms(lambda: pure(x.to(torch.bfloat16)))
    agree = (pure_scores.float().argmax(1) == scores.float().argmax(1)).float().mean().item()
    report["pure_bf16"] = {"ms_per_batch": round(t_pure, 2),
                           "tiles_per_s": round(args.batch / t_pure * 1000, 2),
                           "class_agreement_vs_autocast": round(agree, 5),
                           "cast_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
