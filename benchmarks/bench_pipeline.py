"""(a) Pipeline overhead: `segment` with a near-zero-cost model against a plain copy.

The copy is the I/O floor: a rasterio windowed read of every band and a write of the same
scene with the same tiling and compression. `segment` does everything it always does (strip
reads, normalising, tiling with overlap, smooth blending of C scores, argmax, compressing the
class raster) around a model that costs almost nothing (benchmarks/scenes.py ZeroCostHead).
Both are timed side by side in one run; the best of --repeats is kept.

    python benchmarks/bench_pipeline.py                  # 4096² scene, CPU
    python benchmarks/bench_pipeline.py --size 8192 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import rasterio
from rasterio.windows import Window
from scenes import ZeroCostHead, machine, work_dir, write_scene


def plain_copy(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    with rasterio.open(src) as s:
        profile = s.profile.copy()
        with rasterio.open(dst, "w", **profile) as d:
            block = s.block_shapes[0][0]
            for y in range(0, s.height, block):
                window = Window(0, y, s.width, min(block, s.height - y))
                d.write(s.read(window=window), window=window)
    return time.perf_counter() - t0


def run_segment(src: Path, dst: Path, device: str, batch: int, classes: int,
                blend: str) -> float:
    from crossearth_cli.engine import ModelSpec, SegmentSettings, segment

    spec = ModelSpec(module=ZeroCostHead(classes), class_names=[f"c{i}" for i in range(classes)],
                     crop=512, stride=341, label="zero-cost head")
    t0 = time.perf_counter()
    segment(SegmentSettings(input=src, output=dst, overwrite=True, batch_size=batch,
                            device=device, blend=blend), spec)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--blend", default="gaussian")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = work_dir("crossearth-bench-", args.workdir)
    src = work / f"scene_{args.size}.tif"
    if not src.exists():
        write_scene(src, args.size)
    mpx = args.size * args.size / 1e6
    copies, segs = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        copies.append(plain_copy(src, work / "copy.tif"))
        segs.append(run_segment(src, work / "classes.tif", args.device, args.batch,
                                args.classes, args.blend))
    copy_s, seg_s = min(copies), min(segs)
    result = {
        "benchmark": "pipeline overhead (a)",
        "machine": machine(),
        "scene": f"{args.size}x{args.size} uint8 x3, tiled 512, deflate",
        "device": args.device,
        "tile": 512, "stride": 341, "batch": args.batch, "classes": args.classes,
        "blend": args.blend,
        "copy_s": round(copy_s, 3), "segment_s": round(seg_s, 3),
        "copy_mpx_s": round(mpx / copy_s, 2), "segment_mpx_s": round(mpx / seg_s, 2),
        "ratio": round(copy_s / seg_s, 3),
        "all_copy_s": [round(t, 3) for t in copies], "all_segment_s": [round(t, 3) for t in segs],
    }
    print(f"{'approach':<34} {'seconds':>8} {'Mpx/s':>8}")
    print(f"{'plain windowed copy (floor)':<34} {copy_s:>8.2f} {mpx / copy_s:>8.2f}")
    print(f"{'segment, zero-cost model':<34} {seg_s:>8.2f} {mpx / seg_s:>8.2f}")
    print(f"segment reaches {result['ratio']:.0%} of the copy's Mpx/s ({machine()})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
