"""(b) Against the original approach: mmseg-style evaluation vs `crossearth segment`.

The naive side is a faithful re-implementation of how the original code evaluates a scene:
read the whole scene into memory, normalise it, slide one window at a time (batch 1, fp32)
over it, add each window's scores into a scene-sized float32 canvas and a count canvas,
divide, argmax, write. `segment` runs the same tiny random-weight CrossEarth (same weights,
same windows) with its defaults. Each run is a fresh process so its peak RSS is its own; both
clocks start after the imports and include loading the checkpoint.
It also times the model alone at batch 1 and at `segment`'s batch size (interleaved, best of
4) and prints the ceiling that follows: no pipeline can run the scene's tiles faster than the
model alone at its batch size, so naive seconds / (tiles × that time) bounds the speed-up.
Also the issue-3 memory benchmark: peak RSS of `segment` must stay flat (within 1.2×) from 2k²
to 16k², while the naive approach grows with the area.

    python benchmarks/bench_naive.py                         # 2048, 8192, 16384
    python benchmarks/bench_naive.py --sizes 2048,4096 --json out.json
    python benchmarks/bench_naive.py --repeats 2                # best of 2, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from scenes import machine, tiny_checkpoint, write_scene

from crossearth_cli.raster.windows import tile_count

HERE = Path(__file__).resolve().parent

NAIVE = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, {here!r})
    import numpy as np, rasterio, torch
    from scenes import ROOT
    from crossearth_cli.model import load_checkpoint
    t0 = time.perf_counter()
    model = load_checkpoint({ckpt!r})
    with rasterio.open({src!r}) as ds:
        img = ds.read().astype(np.float32)          # the whole scene in memory
        profile = ds.profile
    mean = np.array([123.675, 116.28, 103.53], np.float32)[:, None, None]
    std = np.array([58.395, 57.12, 57.375], np.float32)[:, None, None]
    x = torch.from_numpy((img - mean) / std)[None]  # 1×3×H×W, normalised in one go
    del img
    _, _, h, w = x.shape
    crop, stride = {crop}, {stride}
    c = model.num_classes
    preds = torch.zeros(1, c, h, w)                 # scene-sized float32 canvases
    count = torch.zeros(1, 1, h, w)
    hg = max(h - crop + stride - 1, 0) // stride + 1
    wg = max(w - crop + stride - 1, 0) // stride + 1
    with torch.no_grad():
        for i in range(hg):
            for j in range(wg):
                y1, x1 = i * stride, j * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                preds[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2])  # batch 1, fp32
                count[:, :, y1:y2, x1:x2] += 1
    classes = (preds / count).argmax(1)[0].numpy().astype(np.uint8)
    profile.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open({out!r}, "w", **profile) as dst:
        dst.write(classes, 1)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({{"seconds": seconds,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """
)

OURS = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, {here!r})
    from pathlib import Path
    from scenes import ROOT
    from crossearth_cli.engine import SegmentSettings
    from crossearth_cli.loading import resolve_model
    from crossearth_cli.engine import segment
    import crossearth_cli.model  # imported before the clock on both sides (timm: ~1.5 s)
    t0 = time.perf_counter()
    spec = resolve_model(checkpoint=Path({ckpt!r}))
    r = segment(SegmentSettings(input=Path({src!r}), output=Path({out!r}), overwrite=True,
                                tile={crop}, stride={stride}, device="cpu"), spec)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({{"seconds": seconds,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """
)


CEILING = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {here!r})
    import torch
    from scenes import ROOT
    from crossearth_cli.allocator import keep_freed_memory
    from crossearth_cli.model import load_checkpoint
    keep_freed_memory()  # as `segment` runs the model on the CPU
    model = load_checkpoint({ckpt!r})
    xs = {{b: torch.randn(b, 3, {crop}, {crop}) for b in (1, {batch})}}
    best = {{b: float("inf") for b in xs}}
    with torch.inference_mode():
        for b, x in xs.items():
            model(x)
        for _ in range(4):  # interleaved, best of 4: the VM is shared
            for b, x in xs.items():
                t = time.perf_counter()
                for _ in range(max(1, 8 // b)):
                    model(x)
                best[b] = min(best[b], (time.perf_counter() - t) / max(1, 8 // b) / b)
    print("RESULT " + json.dumps({{"batch1_ms_per_tile": best[1] * 1000,
          "batch_ms_per_tile": best[{batch}] * 1000, "batch": {batch}}}))
    """
)


def run(code: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def best_of(runs: list[dict]) -> dict:
    """The fastest run, with every run's seconds kept beside it (peak RSS: the largest)."""
    ok = [r for r in runs if "seconds" in r]
    if not ok:
        return runs[0]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    best["all_seconds"] = [round(r["seconds"], 2) for r in ok]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,8192,16384")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--stride", type=int, default=341)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-naive", action="store_true", help="only time `segment`")
    ap.add_argument("--naive-malloc", action="store_true",
                    help="give the naive side segment's malloc settings too (as environment "
                         "variables; see crossearth_cli/allocator.py)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per side and size, interleaved; the best time is kept")
    ap.add_argument("--batch", type=int, default=4,
                    help="segment's CPU batch size (its default), for the model-only ceiling")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="crossearth-naive-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_checkpoint(work / "tiny.pth")
    naive_env = None
    if args.naive_malloc:
        from crossearth_cli.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

        naive_env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                     "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        src = work / f"scene_{size}.tif"
        if not src.exists():
            write_scene(src, size)
        kw = dict(here=str(HERE), ckpt=str(ckpt), src=str(src), crop=args.crop,
                  stride=args.stride)
        ours_runs, naive_runs = [], []
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine
            ours_runs.append(run(OURS.format(out=str(work / f"ours_{size}.tif"), **kw)))
            naive_runs.append({"error": "skipped"} if args.skip_naive
                              else run(NAIVE.format(out=str(work / f"naive_{size}.tif"), **kw),
                                       naive_env))
        ours, naive = best_of(ours_runs), best_of(naive_runs)
        row = {"size": size, "mpx": size * size / 1e6, "ours": ours, "naive": naive}
        if "seconds" in ours and "seconds" in naive:
            row["speedup"] = round(naive["seconds"] / ours["seconds"], 2)
            row["rss_ratio_naive_over_ours"] = round(
                naive["peak_rss_mb"] / ours["peak_rss_mb"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # The model alone: no pipeline can beat tiles × (model time per tile at its batch size).
    ceiling = run(CEILING.format(here=str(HERE), ckpt=str(ckpt), crop=args.crop,
                                 batch=args.batch))
    for r in rows:
        tiles = tile_count(r["size"], r["size"], args.crop, args.stride)
        r["tiles"] = tiles
        if "batch_ms_per_tile" in ceiling and "seconds" in r["naive"] and r["size"] >= args.crop:
            floor_s = tiles * ceiling["batch_ms_per_tile"] / 1000
            r["model_only_seconds_at_batch"] = round(floor_s, 2)
            r["speedup_ceiling"] = round(r["naive"]["seconds"] / floor_s, 2)
    ok = [r for r in rows if "seconds" in r["ours"]]
    flat = (max(r["ours"]["peak_rss_mb"] for r in ok) / min(r["ours"]["peak_rss_mb"] for r in ok)
            if ok else None)
    print(f"\n{'scene':>8} {'ours s':>8} {'naive s':>8} {'speedup':>8} {'ours MB':>8} "
          f"{'naive MB':>9}")
    for r in rows:
        o, n = r["ours"], r["naive"]
        print(f"{r['size']:>7}² {o.get('seconds', float('nan')):>8.1f} "
              f"{n.get('seconds', float('nan')):>8.1f} {r.get('speedup', float('nan')):>7.2f}× "
              f"{o.get('peak_rss_mb', float('nan')):>8.0f} "
              f"{n.get('peak_rss_mb', float('nan')):>9.0f}"
              + (f"  naive: {n['error']}" if "error" in n else ""))
    if flat:
        print(f"segment's peak RSS across sizes: max/min = {flat:.2f}× ({machine()})")
    if "batch_ms_per_tile" in ceiling:
        print(f"model alone: {ceiling['batch1_ms_per_tile']:.1f} ms per tile at batch 1, "
              f"{ceiling['batch_ms_per_tile']:.1f} at batch {args.batch}; a pipeline costing "
              "nothing but the model would reach at most "
              + ", ".join(f"{r['speedup_ceiling']:.2f}× at {r['size']}²" for r in rows
                          if "speedup_ceiling" in r))
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "against the naive approach (b)",
                                         "machine": machine(), "rows": rows,
                                         "model_only": ceiling,
                                         "ours_rss_max_over_min": flat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
