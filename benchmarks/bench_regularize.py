"""Benchmark: what building regularization costs, and whether its outlines overlap.

    python benchmarks/bench_regularize.py [--tiles 5] [--repeats 3] [--json out.json]

Writes a class raster of noisy buildings (rotated rectangles and L shapes on a grid, 25 per
400² tile, 0.5 m pixels, edges roughened by a pixel) and vectorizes it in one process, plain
and with ``--regularize``, each with and without ``--min-area 1`` (which drops the specks the
noise leaves). Prints the best time of ``--repeats`` runs, the regularized run's cost per
building, and the area shared by features of the building layer (zero when no outline spills
onto another). Benchmarks never fail CI; the numbers are as measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import shapely
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scenes import work_dir  # noqa: E402

from crossearth_cli.vector import VectorizeOptions, vectorize_raster  # noqa: E402
from crossearth_cli.vector.synthetic import (  # noqa: E402
    building_grid,
    burn,
    noisy_edges,
    write_class_raster,
)

TILE = 400
PIXEL = 0.5


def tile_of_buildings(seed: int) -> np.ndarray:
    return noisy_edges(burn((TILE, TILE), building_grid(seed)), amplitude=1.0, seed=seed)


def overlap_m2(path: Path) -> float:
    _, _, wkb, _ = pyogrio.raw.read(path, layer="building")
    geoms = shapely.from_wkb(wkb)
    pairs = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    return float(sum(shapely.intersection(geoms[i], geoms[j]).area for i, j in pairs.T if i < j))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=5, help="tiles per side (400 px each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    n = args.tiles
    tiles = [tile_of_buildings(s) for s in range(n * n)]
    mask = np.block([[tiles[n * i + j] for j in range(n)] for i in range(n)]).astype(np.uint8)
    work = work_dir("crossearth-bench-regularize-")
    size = n * TILE
    src = write_class_raster(work / "buildings.tif", mask,
                             transform=from_origin(0, size * PIXEL, PIXEL, PIXEL),
                             names=["background", "building"])
    rows = []
    for min_area in (0.0, 1.0):
        times, counts, overlap = {}, {}, {}
        for regularize in (False, True):
            out = work / f"out_{int(regularize)}_{min_area}.gpkg"
            opts = VectorizeOptions(classes=["building"], regularize=regularize,
                                    min_area=min_area, overwrite=True, workers=1)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                summary = vectorize_raster(src, out, opts)
                best = min(best, time.perf_counter() - t0)
            times[regularize], counts[regularize] = best, summary.polygons
            overlap[regularize] = overlap_m2(out)
        rows.append({
            "min_area_m2": min_area,
            "features": counts[True],
            "plain_s": round(times[False], 3),
            "regularized_s": round(times[True], 3),
            "ratio": round(times[True] / times[False], 2),
            "ms_per_feature": round(1000 * (times[True] - times[False]) / counts[True], 3),
            "overlap_m2_regularized": round(overlap[True], 6),
        })
    print(f"{size}² raster, {PIXEL} m pixels, best of {args.repeats}, one process")
    head = list(rows[0])
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(r[k]) for k in head))
    if args.json:
        args.json.write_text(json.dumps({"size": size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
