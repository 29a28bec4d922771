"""Benchmark: a scene delivered as tiles, segmented file by file against ``--mosaic``.

    python benchmarks/bench_mosaic.py [--size 3000] [--cut 3] [--json out.json]

Writes a ``size``² uint8 scene and the same scene cut into ``cut``×``cut`` files, then runs
``crossearth segment`` (in this process, tiny random-weight model, CPU) three ways: the uncut
scene; the folder of files, one output each (read back through a VRT of the outputs); and the
folder with ``--mosaic``. Prints the time of each and the share of pixels whose class differs
from the uncut scene's, overall and within 64 px of a file edge. The model has random
weights, so how many pixels change is exaggerated: only whether they change counts.
Benchmarks never fail CI; the numbers are as measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scenes import machine, tiny_checkpoint, write_scene  # noqa: E402

NEAR_EDGE = 64  # pixels


def cut_scene(scene: Path, folder: Path, cut: int) -> list[int]:
    """``scene`` as cut×cut GeoTIFFs in ``folder``; returns the file edges (pixels)."""
    folder.mkdir()
    with rasterio.open(scene) as src:
        edges = [round(i * src.width / cut) for i in range(cut + 1)]
        profile = src.profile
        for i, (r0, r1) in enumerate(zip(edges, edges[1:])):
            for j, (c0, c1) in enumerate(zip(edges, edges[1:])):
                w = Window(c0, r0, c1 - c0, r1 - r0)
                profile.update(width=c1 - c0, height=r1 - r0,
                               transform=src.window_transform(w))
                with rasterio.open(folder / f"tile_{i}_{j}.tif", "w", **profile) as dst:
                    dst.write(src.read(window=w))
    return edges


def crossearth(*args) -> float:
    from crossearth_cli.cli import main

    t0 = time.perf_counter()
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"crossearth {' '.join(map(str, args))} exited {exc.code}") from None
    return time.perf_counter() - t0


def differing(a: np.ndarray, b: np.ndarray, near: np.ndarray) -> dict:
    diff = a != b
    return {"differ_pct": round(100 * diff.mean(), 2),
            "differ_near_edges_pct": round(100 * diff[near].mean(), 2),
            "differ_elsewhere_pct": round(100 * diff[~near].mean(), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=3000)
    ap.add_argument("--cut", type=int, default=3, help="files per side")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 4 classes: with this seed the tiny model's classes vary across the synthetic scene
        ckpt = tiny_checkpoint(tmp / "tiny.pth", num_classes=4)
        scene = write_scene(tmp / "scene.tif", args.size)
        edges = cut_scene(scene, tmp / "tiles", args.cut)
        common = ["-c", ckpt, "--device", "cpu", "--overwrite"]
        crossearth("segment", write_scene(tmp / "warm.tif", 256), "-o", tmp / "warm_out.tif",
                   *common)  # imports and first calls, outside the timings
        runs = {
            "uncut scene": (["segment", scene, "-o", tmp / "whole.tif"], tmp / "whole.tif"),
            "file by file": (["segment", tmp / "tiles", "-o", tmp / "per", "--vrt",
                              tmp / "per.vrt"], tmp / "per.vrt"),
            "--mosaic": (["segment", tmp / "tiles", "--mosaic", "-o", tmp / "mosaic.tif"],
                         tmp / "mosaic.tif"),
        }
        seconds = {name: crossearth(*cmd, *common) for name, (cmd, _) in runs.items()}
        near = np.zeros((args.size, args.size), bool)
        for e in edges[1:-1]:
            near[max(e - NEAR_EDGE, 0):e + NEAR_EDGE] = True
            near[:, max(e - NEAR_EDGE, 0):e + NEAR_EDGE] = True
        classes = {}
        for name, (_, out) in runs.items():
            with rasterio.open(out) as ds:
                classes[name] = ds.read(1)
    rows = []
    whole = seconds["uncut scene"]
    print(f"{args.size}² scene in {args.cut}×{args.cut} files; class pixels differing from "
          f"the uncut scene's (near: within {NEAR_EDGE} px of a file edge)")
    print(f"{'run':14} {'time (s)':>9} {'× uncut':>8} {'differ':>8} {'near edges':>11} "
          f"{'elsewhere':>10}")
    for name in runs:
        row = {"run": name, "seconds": round(seconds[name], 2),
               "time_vs_uncut": round(seconds[name] / whole, 3),
               **differing(classes[name], classes["uncut scene"], near)}
        rows.append(row)
        print(f"{name:14} {row['seconds']:9.2f} {row['time_vs_uncut']:8.3f} "
              f"{row['differ_pct']:7.2f}% {row['differ_near_edges_pct']:10.2f}% "
              f"{row['differ_elsewhere_pct']:9.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "size": args.size,
                                         "cut": args.cut, "near_edge_px": NEAR_EDGE,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
