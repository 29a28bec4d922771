"""CrossEarth forward throughput: tiles/s in float32 and under bfloat16 autocast.

One command, random weights (no download), ratios measured in one run:

    python benchmarks/bench_model.py                      # ViT-L, 512×512, CPU
    python benchmarks/bench_model.py --size 1024 --device cuda --batch 4 --json out.json
    python benchmarks/bench_model.py --model tiny         # the test model, seconds
    python benchmarks/bench_model.py --model tiny --batch 4 --modes fp32 --compile
                                              # eager vs torch.compile, with the compile time
    python benchmarks/bench_model.py --batch 4 --modes fp32 --end-to-end 1536
                                              # and `segment` on a 1536² scene, same model

For ViT-L at 512² or 1024² it also gives the achieved TFLOP/s (the reference's 0.89 and 4.8
TFLOP per tile) beside what one large matmul in the same dtype reaches on the same device in
the same run: the hardware's measured compute limit. ``--end-to-end SIZE`` runs `segment`
(engine.segment, with the model held in memory) on a synthetic SIZE² scene with the same
weights, batch and precision, and says what share of model-only tiles/s it keeps. On the
CPU the model-only rows run with `segment`'s malloc settings (crossearth_cli/allocator.py).

Never fails CI: it only measures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_gpu import end_to_end
from scenes import TFLOP_PER_TILE, machine, matmul_tflops, random_model, sync

from crossearth_cli.allocator import keep_freed_memory


def time_mode(net, x, mode: str, warmup: int, repeats: int, device: str) -> dict:
    dev_type = torch.device(device).type
    ctx = (
        torch.autocast(dev_type, dtype=torch.bfloat16)
        if mode == "bf16-autocast"
        else torch.autocast(dev_type, enabled=False)
    )
    if dev_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), ctx:
        for _ in range(warmup):
            out = net(x)
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = net(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    best, mean = min(times), sum(times) / len(times)
    row = {
        "mode": mode,
        "batch": x.shape[0],
        "seconds_per_batch_best": best,
        "seconds_per_batch_mean": mean,
        "tiles_per_s": x.shape[0] / mean,
        "out_dtype": str(out.dtype).replace("torch.", ""),
        "finite": bool(torch.isfinite(out).all()),
    }
    if dev_type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


MATMUL_DTYPE = {"fp32": torch.float32, "bf16-autocast": torch.bfloat16}
SEGMENT_PRECISION = {"fp32": "fp32", "bf16-autocast": "bf16"}


def add_compute_rates(rows: list[dict], size: int, device: str, model: str) -> None:
    """TFLOP/s of each ViT-L row, and its share of a matmul's rate in the same dtype."""
    if model != "vit-l" or size not in TFLOP_PER_TILE:
        return
    n = 8192 if device.startswith("cuda") else 4096
    limits: dict[str, float] = {}
    for row in rows:
        base = row["mode"].removesuffix("+compile")
        if base not in limits:
            limits[base] = matmul_tflops(device, MATMUL_DTYPE[base], n)
        row["tflop_s"] = row["tiles_per_s"] * TFLOP_PER_TILE[size]
        row[f"matmul_{n}_tflop_s"] = limits[base]
        row["share_of_matmul"] = row["tflop_s"] / limits[base]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["vit-l", "tiny"], default="vit-l")
    ap.add_argument("--size", type=int, default=512, help="tile side in pixels (512 or 1024)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--modes", default="fp32,bf16-autocast")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile(model) in each mode (first call = compile)")
    ap.add_argument("--end-to-end", type=int, default=None, metavar="SIZE",
                    help="also run `segment` on a synthetic SIZE² scene in each mode")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # as `segment` runs on the CPU: freed model temporaries stay in the heap (allocator.py)
    malloc_kept = args.device == "cpu" and keep_freed_memory()

    t0 = time.perf_counter()
    net = random_model(args.model == "tiny", args.size, args.device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    rows, e2e_rows = [], []
    work = Path(tempfile.mkdtemp(prefix="crossearth-bench-model-"))
    try:
        for mode in args.modes.split(","):
            rows.append(time_mode(net, x, mode, args.warmup, args.repeats, args.device))
            if args.compile:
                compiled = torch.compile(net, dynamic=False)
                t1 = time.perf_counter()
                row = time_mode(compiled, x, mode, 1, args.repeats, args.device)
                row["mode"] = f"{mode}+compile"
                row["compile_seconds"] = time.perf_counter() - t1 - row[
                    "seconds_per_batch_mean"] * args.repeats  # the warm-up: compile + 1 forward
                rows.append(row)
            if args.end_to_end:
                e2e = end_to_end(net, args.end_to_end, args.device, args.batch,
                                 SEGMENT_PRECISION[mode], work, args.size)
                e2e["mode"] = mode
                e2e["vs_model_only"] = e2e["tiles_per_s"] / rows[-1 - args.compile]["tiles_per_s"]
                e2e_rows.append(e2e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_compute_rates(rows, args.size, args.device, args.model)
    base = rows[0]["tiles_per_s"]
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(
        f"CrossEarth {args.model} ({params:,} parameters), {args.size}×{args.size} tiles, "
        f"batch {args.batch}, {args.device} ({device_name}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; model built in {build_s:.1f} s"
    )
    rated = "tflop_s" in rows[0]
    print(f"{'mode':<22} {'tiles/s':>9} {'s/batch':>9} {'vs first':>8}"
          + (f" {'TFLOP/s':>8} {'of matmul':>9}" if rated else "") + "  out")
    for r in rows:
        compiled = (f"  (compiled in {r['compile_seconds']:.0f} s)"
                    if "compile_seconds" in r else "")
        rate = (f" {r['tflop_s']:>8.3f} {r['share_of_matmul']:>8.0%}" if rated else "")
        print(
            f"{r['mode']:<22} {r['tiles_per_s']:>9.3f} {r['seconds_per_batch_mean']:>9.2f} "
            f"{r['tiles_per_s'] / base:>7.2f}×{rate}  "
            f"{r['out_dtype']}{'' if r['finite'] else ' NaN!'}" + compiled
        )
    if rated:
        limits = {r["mode"].removesuffix("+compile"): v for r in rows
                  for k, v in r.items() if k.startswith("matmul_")}
        print("matmul limit (same device, same run): "
              + ", ".join(f"{m} {v:.3f} TFLOP/s" for m, v in limits.items()))
    for e in e2e_rows:
        print(f"segment, {e['scene']} scene, {e['mode']}: {e['tiles']} tiles in "
              f"{e['seconds']:.1f} s = {e['tiles_per_s']:.3f} tiles/s, "
              f"{e['vs_model_only']:.0%} of model-only")
    if args.json:
        report = {
            "model": args.model,
            "parameters": params,
            "config": net.config.to_dict(),
            "size": args.size,
            "device": args.device,
            "device_name": device_name,
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "cpu_malloc_kept": malloc_kept,
            "torch": torch.__version__,
            "build_seconds": build_s,
            "results": rows,
            "end_to_end": e2e_rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
