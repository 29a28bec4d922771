"""CrossEarth forward throughput: tiles/s in float32 and under bfloat16 autocast.

One command, random weights (no download), ratios measured in one run:

    python benchmarks/bench_model.py                      # ViT-L, 512×512, CPU
    python benchmarks/bench_model.py --size 1024 --device cuda --batch 4 --json out.json
    python benchmarks/bench_model.py --model tiny         # the test model, seconds
    python benchmarks/bench_model.py --model tiny --batch 4 --modes fp32 --compile
                                              # eager vs torch.compile, with the compile time

Never fails CI: it only measures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def build(model: str, size: int, device: str):
    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model.random_init import random_state_dict, tiny_config, vit_large_config

    config = vit_large_config(6, img_size=size) if model == "vit-l" else tiny_config(img_size=size)
    with torch.device("meta"):
        net = CrossEarth(config)
    net.load_state_dict(random_state_dict(config, seed=0), assign=True)
    return net.to(device).eval(), config


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    net, config = build(args.model, args.size, args.device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    rows = []
    for mode in args.modes.split(","):
        rows.append(time_mode(net, x, mode, args.warmup, args.repeats, args.device))
        if args.compile:
            compiled = torch.compile(net, dynamic=False)
            t1 = time.perf_counter()
            row = time_mode(compiled, x, mode, 1, args.repeats, args.device)
            row["mode"] = f"{mode}+compile"
            row["compile_seconds"] = time.perf_counter() - t1 - row["seconds_per_batch_mean"] * (
                args.repeats)  # the warm-up call, i.e. compiling plus one forward
            rows.append(row)
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
    print(f"{'mode':<22} {'tiles/s':>9} {'s/batch':>9} {'vs first':>8}  out")
    for r in rows:
        compiled = (f"  (compiled in {r['compile_seconds']:.0f} s)"
                    if "compile_seconds" in r else "")
        print(
            f"{r['mode']:<22} {r['tiles_per_s']:>9.3f} {r['seconds_per_batch_mean']:>9.2f} "
            f"{r['tiles_per_s'] / base:>7.2f}×  {r['out_dtype']}{'' if r['finite'] else ' NaN!'}"
            + compiled
        )
    if args.json:
        report = {
            "model": args.model,
            "parameters": params,
            "config": config.to_dict(),
            "size": args.size,
            "device": args.device,
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "build_seconds": build_s,
            "results": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
