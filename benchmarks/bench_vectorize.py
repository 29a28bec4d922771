"""Benchmark: windowed vectorize vs the naive whole-array polygonize + fiona write.

    python benchmarks/bench_vectorize.py [--size 10000] [--small 5000] [--json out.json]

Writes tiled class GeoTIFFs (size×size, ~1300 objects per Mpx: buildings, roads, trees) into
a work folder, then runs each approach in its own subprocess and records wall time and the
peak resident memory of the whole process tree (parent + workers, sampled with psutil; shared
pages of forked workers are counted once per process, so this over- rather than under-states).

Approaches:

* ``naive``: ``rasterio.features.shapes`` over the full array (foreground passed as the mask,
  the well-known speed-up) and a fiona write of every feature with its class id — what the
  peers in ``../shared/reference/peers.md`` do.
* ``windowed``: ``crossearth_cli.vector.vectorize_raster`` (windows, merged seams, true-metre
  attributes, pyogrio), default workers.
* ``windowed-1p``: the same in a single process, to separate the algorithm from parallelism.

The smaller raster shows whether memory grows with the raster. Benchmarks never fail CI; the
numbers are printed (and written to ``--json``) as measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    r"""
    import json, os, sys, threading, time
    import psutil

    peak = 0
    stop = False

    def sample():
        global peak
        me = psutil.Process()
        while not stop:
            try:
                total = me.memory_info().rss
                for c in me.children(recursive=True):
                    try:
                        total += c.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.02)

    approach, src, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import numpy as np
    import rasterio
    t_import = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    if approach == "naive":
        import fiona
        from rasterio.features import shapes
        with rasterio.open(src) as ds:
            arr = ds.read(1)
            transform, crs = ds.transform, ds.crs
        mask = (arr > 0) & (arr != 255)
        schema = {"geometry": "Polygon", "properties": {"class_id": "int"}}
        n = 0
        with fiona.open(out, "w", driver="GPKG", schema=schema, crs=crs.to_wkt(),
                        layer="polygons") as dst:
            records = ({"geometry": g, "properties": {"class_id": int(v)}}
                       for g, v in shapes(arr, mask=mask, transform=transform))
            for rec in records:
                dst.write(rec)
                n += 1
        result = {"features": n}
    else:
        from crossearth_cli.vector import VectorizeOptions, vectorize_raster
        opts = VectorizeOptions(classes=["building", "road", "tree"], workers=workers,
                                layer_per_class=False)
        s = vectorize_raster(src, out, opts)
        result = {"features": s.polygons, "workers": s.workers, "windows": s.windows}
    seconds = time.perf_counter() - t0
    stop = True
    thread.join()
    import resource
    result.update(seconds=seconds, peak_rss_mb=peak / 2**20,
                  maxrss_self_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  maxrss_children_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))
    """
)


def make_raster(path: Path, size: int, objects_per_mpx: float) -> dict:
    """A tiled class GeoTIFF written band by band (the benchmark never holds it whole)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from crossearth_cli.vector.synthetic import benchmark_block

    names = ["background", "building", "road", "tree"]
    profile = dict(
        driver="GTiff", width=size, height=size, count=1, dtype="uint8", nodata=255,
        crs="EPSG:32631", transform=from_origin(500000, 5800000, 0.3, 0.3), tiled=True,
        blockxsize=512, blockysize=512, compress="deflate",
    )
    band = 512
    with rasterio.open(path, "w", **profile) as ds:
        for r in range(0, size, band):
            h = min(band, size - r)
            block = benchmark_block(h, size, seed=r, objects_per_mpx=objects_per_mpx)
            ds.write(block, 1, window=Window(0, r, size, h))
        ds.update_tags(classes=json.dumps(names), **{f"class_{i}": n for i, n in enumerate(names)})
    del np
    return {"size": size, "path": str(path)}


def run(approach: str, src: Path, out: Path, workers: int) -> dict:
    if out.exists():
        out.unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, approach, str(src), str(out), str(workers)],
        capture_output=True, text=True, env=env,
    )
    wall = time.perf_counter() - t
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"approach": approach, "error": proc.stderr.strip().splitlines()[-1:]}
    res = json.loads(line[0][7:])
    res.update(approach=approach, process_wall_s=wall, output_mb=out.stat().st_size / 2**20)
    res["ogrinfo"] = ogrinfo_check(out)
    return res


def ogrinfo_check(path: Path) -> str:
    """Debian's ogrinfo reopens the file: layer, feature count, no warnings."""
    if shutil.which("ogrinfo") is None:
        return "ogrinfo absent"
    p = subprocess.run(["ogrinfo", "-so", "-al", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        return f"ogrinfo failed: {p.stderr.strip()[:80]}"
    counts = [ln.split(":")[1].strip() for ln in p.stdout.splitlines() if "Feature Count" in ln]
    warn = "warning" if "Warning" in p.stderr else "ok"
    return f"{warn}, features {'+'.join(counts)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=10_000, help="big raster side, pixels")
    ap.add_argument("--small", type=int, default=5_000, help="small raster side (0: skip)")
    ap.add_argument("--objects-per-mpx", type=float, default=1300.0, help="~100k polygons at 10k²")
    ap.add_argument("--workers", type=int, default=0, help="for 'windowed' (0 = automatic)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/crossearth-bench-vectorize"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the rasters for the next run")
    args = ap.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [s for s in (args.small, args.size) if s]
    results = []
    for size in sizes:
        src = args.workdir / f"classes_{size}.tif"
        if not src.exists():
            t = time.perf_counter()
            make_raster(src, size, args.objects_per_mpx)
            print(f"wrote {src} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for approach, workers in (("naive", 1), ("windowed", args.workers), ("windowed-1p", 1)):
            mode = "naive" if approach == "naive" else "windowed"
            out = args.workdir / f"{approach}_{size}.gpkg"
            r = run(mode, src, out, workers)
            r.update(approach=approach, size=size)
            results.append(r)
            print(f"  {size:>6} {approach:<12} {r.get('seconds', float('nan')):7.1f} s "
                  f"{r.get('peak_rss_mb', float('nan')):8.0f} MB", file=sys.stderr)
            out.unlink(missing_ok=True)

    print()
    print(f"{'raster':>12} {'approach':<12} {'time s':>8} {'peak RSS MB':>12} "
          f"{'features':>9} {'vs naive':>14}  ogrinfo")
    for r in results:
        if "error" in r:
            print(f"{r['size']:>12} {r['approach']:<12} ERROR {r['error']}")
            continue
        base = next(b for b in results if b["size"] == r["size"] and b["approach"] == "naive")
        ratio = ""
        if r is not base and "seconds" in base:
            ratio = (f"{base['seconds'] / r['seconds']:.1f}x faster, "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x mem")
        side = f"{r['size']}x{r['size']}"
        print(f"{side:>12} {r['approach']:<12} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['features']:>9} {ratio:>14}  {r['ogrinfo']}")
    if len(sizes) == 2:
        print()
        for a in ("naive", "windowed", "windowed-1p"):
            rs = [r for r in results if r["approach"] == a and "peak_rss_mb" in r]
            if len(rs) == 2:
                print(f"memory growth {a:<12} {sizes[0]}² → {sizes[1]}² "
                      f"({(sizes[1] / sizes[0]) ** 2:.0f}x pixels): "
                      f"{rs[1]['peak_rss_mb'] / rs[0]['peak_rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2))
    if not args.keep:
        for s in sizes:
            (args.workdir / f"classes_{s}.tif").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
