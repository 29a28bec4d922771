"""The Mask2Former head alone: attention masks from the mask features resized once per level
(as `crossearth` runs it) against each layer's full-size mask logits resized to the level
(mmdet's order), interleaved on the same backbone features.

    python benchmarks/bench_head.py                        # ViT-L, one 512² tile, CPU
    python benchmarks/bench_head.py --batch 16 --device cuda --precision bf16 --json out.json

Never fails CI: it only measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from bench_gpu import masks_resized_per_layer
from scenes import machine, random_model, sync

from crossearth_cli.model.crossearth import FEATURE_SCALES

ORDERS = {"features resized per level": contextlib.nullcontext,
          "logits resized per layer (mmdet)": masks_resized_per_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["vitl", "tiny"], default="vitl")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    net = random_model(args.model == "tiny", args.size, args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    dev_type = torch.device(args.device).type
    autocast = torch.autocast(dev_type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")
    times: dict[str, list[float]] = {name: [] for name in ORDERS}
    with torch.inference_mode(), autocast:
        maps, queries = net.backbone.forward_maps(x)
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for name, order in ORDERS.items():
                with order():
                    sync(args.device)
                    t0 = time.perf_counter()
                    net.decode_head(maps, queries, FEATURE_SCALES)
                    sync(args.device)
                    if rnd:
                        times[name].append(time.perf_counter() - t0)
    rows = {name: {"best_ms": round(min(t) * 1e3, 1),
                   "mean_ms": round(sum(t) / len(t) * 1e3, 1)} for name, t in times.items()}
    print(f"{'attention masks from':36s} {'best ms':>9s} {'mean ms':>9s}")
    for name, row in rows.items():
        print(f"{name:36s} {row['best_ms']:9.1f} {row['mean_ms']:9.1f}")
    report = {"benchmark": "bench_head", "machine": machine(), "model": args.model,
              "size": args.size, "batch": args.batch, "device": args.device,
              "precision": args.precision, "repeats": args.repeats, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
