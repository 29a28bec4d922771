"""(b) Against the original approach: mmseg-style evaluation vs `crossearth segment`.

The naive side re-implements how the original code evaluates a scene: read the whole scene
into memory, normalise it, slide one window at a time (batch 1, fp32) over it, add each
window's scores into a scene-sized float32 canvas and a count canvas, divide, argmax, write.
It comes in two forms, both run by default:

- ``mmseg``: exactly mmseg's ``EncoderDecoder.slide_inference``, which adds each window as
  ``preds += F.pad(window_scores, ...)``, i.e. one scene-sized tensor per window, then
  ``postprocess_result``'s bilinear resize to the original shape before the argmax. This is
  what the original code runs; its cost per window grows with the scene's area.
- ``sliced``: the same loop with the window added into its slice of the canvas, and no resize.
  Kinder to the naive side than mmseg is; it isolates what batching, streaming and blending
  in bounded memory buy.

Both forms give the same class map (checked and reported). `segment` runs the same tiny
random-weight CrossEarth (same weights, same windows) with its defaults. Each run is a fresh
process so its peak RSS is its own; both clocks start after the imports and include loading
the checkpoint. A naive form is not started where its canvases would not fit in this
machine's available memory (the estimate is printed instead).
It also times the model alone at batch 1 and at `segment`'s batch size (interleaved, best of
4) and prints the ceiling that follows: no pipeline can run the scene's tiles faster than the
model alone at its batch size, so naive seconds / (tiles × that time) bounds the speed-up.
Also the issue-3 memory benchmark: peak RSS of `segment` must stay flat (within 1.2×) from 2k²
to 16k², while the naive approach grows with the area.

    python benchmarks/bench_naive.py                         # 2048, 8192, 16384
    python benchmarks/bench_naive.py --sizes 2048,4096 --json out.json
    python benchmarks/bench_naive.py --repeats 2                # best of 2, interleaved
    python benchmarks/bench_naive.py --naive-modes sliced       # only the kinder form
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from scenes import class_agreement, machine, tiny_checkpoint, work_dir, write_scene

from crossearth_cli.raster.windows import tile_count

HERE = Path(__file__).resolve().parent

NAIVE = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {here!r})
    import numpy as np, rasterio, torch
    import torch.nn.functional as F
    from scenes import ROOT, ZeroCostHead, peak_rss_mb
    from crossearth_cli.model import load_checkpoint
    t0 = time.perf_counter()
    model = {naive_model}
    with rasterio.open({src!r}) as ds:
        img = ds.read().astype(np.float32)          # the whole scene in memory
        profile = ds.profile
    mean = np.array([123.675, 116.28, 103.53], np.float32)[:, None, None]
    std = np.array([58.395, 57.12, 57.375], np.float32)[:, None, None]
    x = torch.from_numpy((img - mean) / std)[None]  # 1×3×H×W, normalised in one go
    del img
    _, _, h, w = x.shape
    crop, stride = {crop}, {stride}
    c = {classes}
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
                crop_scores = model(x[:, :, y1:y2, x1:x2])  # batch 1, fp32
                {accumulate}
                count[:, :, y1:y2, x1:x2] += 1
    seg_logits = preds / count
    {postprocess}
    classes = seg_logits[0].argmax(0).numpy().astype(np.uint8)
    profile.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open({out!r}, "w", **profile) as dst:
        dst.write(classes, 1)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({{"seconds": seconds,
          "peak_rss_mb": peak_rss_mb()}}))
    """
)

OURS = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {here!r})
    from pathlib import Path
    from scenes import ROOT, ZeroCostHead, peak_rss_mb
    from crossearth_cli.engine import ModelSpec, SegmentSettings, segment
    from crossearth_cli.loading import resolve_model
    import crossearth_cli.model  # imported before the clock on both sides (timm: ~1.5 s)
    t0 = time.perf_counter()
    spec = {ours_model}
    r = segment(SegmentSettings(input=Path({src!r}), output=Path({out!r}), overwrite=True,
                                tile={crop}, stride={stride}, device="cpu"), spec)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({{"seconds": seconds,
          "peak_rss_mb": peak_rss_mb()}}))
    """
)

CLASSES = 6  # the tiny checkpoint's and the zero-cost head's


def model_code(model: str, ckpt: Path, crop: int, stride: int) -> dict:
    """The expression each side builds its model with: the tiny random-weight CrossEarth, or
    the zero-cost head (scores that depend on the pixels, for checking window placement)."""
    if model == "zero":
        names = [f"c{i}" for i in range(CLASSES)]
        return dict(naive_model=f"ZeroCostHead({CLASSES})",
                    ours_model=f"ModelSpec(module=ZeroCostHead({CLASSES}), class_names={names!r},"
                               f" crop={crop}, stride={stride}, label='zero-cost head')")
    return dict(naive_model=f"load_checkpoint({str(ckpt)!r})",
                ours_model=f"resolve_model(checkpoint=Path({str(ckpt)!r}))")


# How each naive form adds a window's scores, and what it does before the argmax.
NAIVE_MODES = {
    "mmseg": dict(  # mmseg EncoderDecoder.slide_inference + BaseSegmentor.postprocess_result
        accumulate="preds += F.pad(crop_scores, (x1, w - x2, y1, h - y2))",
        postprocess='seg_logits = F.interpolate(seg_logits, size=(h, w), mode="bilinear", '
                    'align_corners=False)',
    ),
    "sliced": dict(
        accumulate="preds[:, :, y1:y2, x1:x2] += crop_scores",
        postprocess="pass",
    ),
}


def naive_bytes_per_pixel(mode: str, bands: int = 3, classes: int = CLASSES) -> int:
    """Peak bytes per scene pixel of a naive form (its larger stage).

    Normalising holds the uint8 scene, its float32 copy, one temporary and the result. Then
    the float32 scene, the score and count canvases, ``preds / count`` and the int64 argmax;
    mmseg's form also holds the resized scores (its padded window is freed by then).
    """
    normalise = bands * (1 + 3 * 4)
    evaluate = 4 * bands + 4 * classes + 4 + 4 * classes + 8
    if mode == "mmseg":
        evaluate += 4 * classes
    return max(normalise, evaluate)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def time_size(size: int, args, work: Path, ckpt: Path, modes: list[str],
              naive_env: dict | None) -> dict:
    """`segment` and each naive form on one synthetic scene, interleaved; best of repeats."""
    src = work / f"scene_{size}.tif"
    if not src.exists():
        write_scene(src, size)
    kw = dict(here=str(HERE), src=str(src), crop=args.crop, stride=args.stride, classes=CLASSES,
              **model_code(args.model, ckpt, args.crop, args.stride))
    px, free = size * size, available_bytes()
    runs: dict[str, list[dict]] = {"ours": [], **{m: [] for m in modes}}
    for _ in range(args.repeats):  # interleaved, so every side sees the same machine
        runs["ours"].append(run(OURS.format(out=str(work / f"ours_{size}.tif"), **kw)))
        for m in modes:
            need = naive_bytes_per_pixel(m) * px
            if need > free:
                runs[m].append({"error": f"not run: needs ~{need / 2**30:.1f} GiB, "
                                         f"{free / 2**30:.1f} GiB available"})
                continue
            code = NAIVE.format(out=str(work / f"{m}_{size}.tif"), **kw, **NAIVE_MODES[m])
            runs[m].append(run(code, naive_env))
    ours = best_of(runs["ours"])
    row = {"size": size, "mpx": px / 1e6, "tiles": tile_count(size, size, args.crop, args.stride),
           "ours": ours, "naive": {m: best_of(runs[m]) for m in modes},
           "speedup": {}, "rss_ratio_naive_over_ours": {}, "agreement_with_segment": {}}
    for m, n in row["naive"].items():
        if "seconds" in ours and "seconds" in n:
            row["speedup"][m] = round(n["seconds"] / ours["seconds"], 2)
            row["rss_ratio_naive_over_ours"][m] = round(n["peak_rss_mb"] / ours["peak_rss_mb"], 2)
            row["agreement_with_segment"][m] = round(
                class_agreement(work / f"ours_{size}.tif", work / f"{m}_{size}.tif"), 4)
    done = [m for m in row["naive"] if "seconds" in row["naive"][m]]
    if len(done) > 1:  # the naive forms differ only in how they add windows: same map
        row["naive_forms_agree"] = all(
            class_agreement(work / f"{done[0]}_{size}.tif", work / f"{m}_{size}.tif") == 1.0
            for m in done[1:])
    return row


def print_table(rows: list[dict], modes: list[str]) -> None:
    nan = float("nan")
    head = f"\n{'scene':>8} {'segment s':>10} {'MB':>6}"
    for m in modes:
        head += f" | {m + ' s':>9} {'speedup':>8} {'MB':>6}"
    print(head)
    for r in rows:
        o = r["ours"]
        line = f"{r['size']:>7}² {o.get('seconds', nan):>10.1f} {o.get('peak_rss_mb', nan):>6.0f}"
        notes = []
        for m in modes:
            n = r["naive"][m]
            line += (f" | {n.get('seconds', nan):>9.1f} {r['speedup'].get(m, nan):>7.2f}×"
                     f" {n.get('peak_rss_mb', nan):>6.0f}")
            if "error" in n:
                notes.append(f"{m}: {n['error']}")
        print(line + ("  " + "; ".join(notes) if notes else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,8192,16384")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--stride", type=int, default=341)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--naive-modes", default="mmseg,sliced",
                    help="naive forms to run, comma-separated: " + ", ".join(NAIVE_MODES)
                         + "; empty: only time `segment`")
    ap.add_argument("--naive-malloc", action="store_true",
                    help="give the naive side segment's malloc settings too (as environment "
                         "variables; see crossearth_cli/allocator.py)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per side and size, interleaved; the best time is kept")
    ap.add_argument("--batch", type=int, default=4,
                    help="segment's CPU batch size (its default), for the model-only ceiling")
    ap.add_argument("--skip-ceiling", action="store_true", help="do not time the model alone")
    ap.add_argument("--model", choices=["tiny", "zero"], default="tiny",
                    help="tiny: the tiny CrossEarth (the benchmark); zero: the zero-cost head, "
                         "whose scores follow the pixels (checks where each window lands)")
    args = ap.parse_args()
    modes = [m for m in args.naive_modes.split(",") if m]
    unknown = sorted(set(modes) - set(NAIVE_MODES))
    if unknown:
        ap.error(f"unknown naive form {', '.join(unknown)}; choose from {', '.join(NAIVE_MODES)}")
    work = work_dir("crossearth-naive-", args.workdir)
    ckpt = tiny_checkpoint(work / "tiny.pth", num_classes=CLASSES)
    naive_env = None
    if args.naive_malloc:
        from crossearth_cli.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

        naive_env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                     "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.append(time_size(size, args, work, ckpt, modes, naive_env))
        print(json.dumps(rows[-1]), flush=True)
    # The model alone: no pipeline can beat tiles × (model time per tile at its batch size).
    ceiling = {} if args.skip_ceiling or args.model == "zero" else run(CEILING.format(
        here=str(HERE), ckpt=str(ckpt), crop=args.crop, batch=args.batch))
    for r in rows:
        if "batch_ms_per_tile" in ceiling and r["size"] >= args.crop:
            floor_s = r["tiles"] * ceiling["batch_ms_per_tile"] / 1000
            r["model_only_seconds_at_batch"] = round(floor_s, 2)
            r["speedup_ceiling"] = {m: round(n["seconds"] / floor_s, 2)
                                    for m, n in r["naive"].items() if "seconds" in n}
    ok = [r for r in rows if "seconds" in r["ours"]]
    flat = (max(r["ours"]["peak_rss_mb"] for r in ok) / min(r["ours"]["peak_rss_mb"] for r in ok)
            if ok else None)
    print_table(rows, modes)
    if flat:
        print(f"segment's peak RSS across sizes: max/min = {flat:.2f}× ({machine()})")
    for r in rows:
        agree = ", ".join(f"{m} {100 * a:.2f} %" for m, a in r["agreement_with_segment"].items())
        if agree:
            print(f"{r['size']}²: class maps equal to segment's on: {agree}"
                  + ("" if r.get("naive_forms_agree", True) else "; THE NAIVE FORMS DISAGREE"))
    if "batch_ms_per_tile" in ceiling:
        print(f"model alone: {ceiling['batch1_ms_per_tile']:.1f} ms per tile at batch 1, "
              f"{ceiling['batch_ms_per_tile']:.1f} at batch {args.batch}; a pipeline costing "
              "nothing but the model would reach at most "
              + ", ".join(f"{v:.2f}× ({m}) at {r['size']}²" for r in rows
                          for m, v in r.get("speedup_ceiling", {}).items()))
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "against the naive approach (b)",
                                         "machine": machine(), "rows": rows,
                                         "model_only": ceiling,
                                         "ours_rss_max_over_min": flat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
