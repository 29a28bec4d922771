"""Benchmark: what ``--aoi`` saves against segmenting the whole scene and cropping.

    python benchmarks/bench_aoi.py [--size 4096] [--repeats 2] [--json out.json]

Writes a ``size``² uint8 scene and segments it with the tiny random-weight model on the CPU,
in one process: the whole scene; a box covering the middle quarter of its area; and twelve
scattered 150 m parcels (polygons) whose bounding box is most of the scene. Prints the best
time of ``--repeats`` runs, tiles run, and the time against the whole scene. Benchmarks never
fail CI; the numbers are as measured in this run.
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
import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scenes import machine, random_model, write_scene  # noqa: E402
from crossearth_cli.engine import ModelSpec, SegmentSettings, segment  # noqa: E402
from crossearth_cli.raster.aoi import AreaOfInterest  # noqa: E402


def areas(path: Path) -> dict[str, AreaOfInterest | None]:
    with rasterio.open(path) as ds:
        t, n = ds.transform, ds.width
    box = shapely.box(*(t * (n / 4, 3 * n / 4)), *(t * (3 * n / 4, n / 4)))
    rng = np.random.default_rng(0)
    side = 300  # pixels: 150 m at 0.5 m
    corners = rng.uniform(0.05 * n, 0.95 * n - side, size=(12, 2))
    parcels = shapely.MultiPolygon([
        shapely.box(*(t * (x, y + side)), *(t * (x + side, y))) for x, y in corners])
    return {"whole scene": None, "box, 1/4 of the area": AreaOfInterest(((None, box),), "box"),
            "12 parcels of 150 m": AreaOfInterest(((None, parcels),), "parcels")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    spec = ModelSpec(module=random_model(True, 512, "cpu"),
                     class_names=[f"c{i}" for i in range(6)],
                     palette=[(40 * i, 40 * i, 40 * i) for i in range(6)], crop=512, stride=341,
                     label="tiny random-weight model")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scene = write_scene(Path(tmp) / "scene.tif", args.size)
        for name, aoi in areas(scene).items():
            best, result = float("inf"), None
            for _ in range(args.repeats):
                settings = SegmentSettings(input=scene, output=Path(tmp) / "out.tif",
                                           device="cpu", overwrite=True, aoi=aoi)
                t0 = time.perf_counter()
                result = segment(settings, spec)
                best = min(best, time.perf_counter() - t0)
            rows.append({"area": name, "seconds": round(best, 2),
                         "tiles_run": result.tiles - result.tiles_skipped,
                         "output_px": result.pixels, "window": result.window})
    whole = rows[0]["seconds"]
    print(f"{'area':24} {'time (s)':>9} {'tiles run':>10} {'output Mpx':>11} {'× whole':>8}")
    for r in rows:
        r["time_vs_whole"] = round(r["seconds"] / whole, 3)
        print(f"{r['area']:24} {r['seconds']:9.2f} {r['tiles_run']:10d} "
              f"{r['output_px'] / 1e6:11.2f} {r['time_vs_whole']:8.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "size": args.size,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
