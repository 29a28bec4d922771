"""Rasters on a server: a folder of small files and one large scene, read over HTTP against
the same files on disk, with the server's answers delayed as a distant server's are.

A local HTTP server with byte ranges (``tests/range_server.py``) stands in for S3 or a web
server; ``--latency-ms`` delays each of its answers (requests in flight together wait
together). The model costs almost nothing (``ZeroCostHead``), so what is timed is reading,
the pipeline and writing. Remote inputs are read twice: as the CLI reads them (files opened
``REMOTE_READ_AHEAD`` at a time, ``NETWORK_IO_THREADS`` reader threads) and as local files
are read (one file ahead, the CPU's reader threads), to show what those two settings buy.
Every remote run reads through fresh URLs (an alias folder per run), so GDAL's block cache
in this process never answers for the server. The runs alternate; the best of ``--repeats``
is kept.

    python benchmarks/bench_remote.py                          # 0 and 30 ms
    python benchmarks/bench_remote.py --latency-ms 0 30 80 --json out.json
    python benchmarks/bench_remote.py --latency-ms 30 --mb-per-s 10    # a slow connection
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scenes import ZeroCostHead, machine, work_dir, write_scene, write_tiles

SERVER = Path(__file__).resolve().parents[1] / "tests" / "range_server.py"


class Server:
    """``range_server.py`` serving ``root`` in a process of its own."""

    def __init__(self, root: Path, log: Path, latency_ms: float, mb_per_s: float):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), root, log, str(latency_ms), str(mb_per_s)],
            stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def traffic(self) -> tuple[int, int]:
        """(requests, bytes sent) since the last call."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.write_text("")
        return len(lines), sum(json.loads(line)["bytes"] for line in lines)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_folder(session, source: str, out: Path) -> tuple[float, int]:
    """``crossearth segment SOURCE -o OUT`` as the CLI runs it: (seconds, pixels)."""
    from crossearth_cli.batch import Manifest, expand_inputs, run_batch
    from crossearth_cli.engine import SegmentSettings

    template = SegmentSettings(input=Path("."), output=Path("x.tif"), device="cpu",
                               overwrite=True)
    t0 = time.perf_counter()
    items = expand_inputs([source])  # a remote folder is listed here: part of the wait
    result = run_batch(items, out, template, session, ["classes"], "bench", Manifest(out))
    seconds = time.perf_counter() - t0
    assert not result.failed, result.failed
    return seconds, result.pixels


def run_scene(session, source: str | Path, out: Path) -> tuple[float, int]:
    from crossearth_cli.engine import SegmentSettings

    settings = SegmentSettings(input=source, output=out, device="cpu", overwrite=True)
    t0 = time.perf_counter()
    result = session.run(session.prepare(settings))
    return time.perf_counter() - t0, result.pixels


@contextlib.contextmanager
def read_as_local(on: bool):
    """Remote files read ahead one at a time, as local files are (``on``)."""
    from crossearth_cli import batch

    saved = batch.REMOTE_READ_AHEAD
    batch.REMOTE_READ_AHEAD = 1 if on else saved
    try:
        yield
    finally:
        batch.REMOTE_READ_AHEAD = saved


def main() -> None:
    from crossearth_cli.engine import ModelSpec, Session
    from crossearth_cli.raster.remote import use_network_defaults

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=32, help="small files in the folder")
    ap.add_argument("--size", type=int, default=512, help="their side")
    ap.add_argument("--scene", type=int, default=4096, help="the large scene's side")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 30.0])
    ap.add_argument("--mb-per-s", type=float, default=0.0,
                    help="cap on each request's rate (0: none), as one connection to S3 is")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    use_network_defaults()  # what the CLI sets for remote inputs
    work = work_dir("crossearth-remote-", args.workdir)
    data = work / "www" / "data"
    tiles = write_tiles(data / "tiles", args.files, args.size)
    scene = write_scene(data / "scene.tif", args.scene)
    sizes = {"folder": sum(p.stat().st_size for p in tiles.iterdir()),
             "scene": scene.stat().st_size}
    mpx = {"folder": args.files * args.size**2 / 1e6, "scene": args.scene**2 / 1e6}
    spec = ModelSpec(module=ZeroCostHead(6), class_names=[f"c{i}" for i in range(6)])
    rows, alias = [], 0
    kinds = ("folder", "scene")
    ways = ("local", "remote", "remote_as_local")
    with (Session(spec, "cpu", "fp32", 4) as local_session,
          Session(spec, "cpu", "fp32", 4, network=True) as network_session):
        sessions = {"local": local_session, "remote": network_session,
                    "remote_as_local": local_session}
        for latency in args.latency_ms:
            server = Server(work / "www", work / "requests.jsonl", latency, args.mb_per_s)
            try:
                runs = {(kind, way): [] for kind in kinds for way in ways}
                traffic = {}
                for _ in range(args.repeats):
                    for (kind, way), times in runs.items():
                        alias += 1  # fresh URLs: nothing from GDAL's cache in this process
                        os.symlink(data, work / "www" / f"r{alias}")
                        base = f"{server.url}/r{alias}"
                        out = work / "out" / f"{alias}"
                        source = {("folder", "local"): str(tiles), ("scene", "local"): scene,
                                  ("folder", "remote"): f"{base}/tiles/",
                                  ("scene", "remote"): f"{base}/scene.tif"}[
                                      kind, "local" if way == "local" else "remote"]
                        with read_as_local(way == "remote_as_local"):
                            if kind == "folder":
                                seconds, _ = run_folder(sessions[way], source, out)
                            else:
                                seconds, _ = run_scene(sessions[way], source,
                                                            out.with_suffix(".tif"))
                        times.append(seconds)
                        traffic[kind, way] = server.traffic()
                for kind in kinds:
                    local = min(runs[kind, "local"])
                    for way in ways[1:]:
                        requests, sent = traffic[kind, way]
                        rows.append({
                            "latency_ms": latency, "mb_per_s": args.mb_per_s or None,
                            "input": kind, "read": way,
                            "local_s": local, "remote_s": min(runs[kind, way]),
                            "mpx": mpx[kind],
                            "requests": requests, "bytes_sent": sent,
                            "file_bytes": sizes[kind], "all_local_s": runs[kind, "local"],
                            "all_remote_s": runs[kind, way]})
            finally:
                server.close()

    print(f"{'latency':>8} {'input':<22} {'remote read':<16} {'local s':>8} {'remote s':>9} "
          f"{'× local':>8} {'requests':>9} {'fetched / file bytes':>21}")
    for r in rows:
        what = (f"{args.files} files of {args.size}²" if r["input"] == "folder"
                else f"one {args.scene}² scene")
        how = "as the CLI does" if r["read"] == "remote" else "as a local file"
        r["remote_vs_local"] = round(r["remote_s"] / r["local_s"], 3)
        r["fetched_vs_file"] = round(r["bytes_sent"] / r["file_bytes"], 3)
        print(f"{r['latency_ms']:>6.0f}ms {what:<22} {how:<16} {r['local_s']:>8.2f} "
              f"{r['remote_s']:>9.2f} {r['remote_vs_local']:>8.2f} {r['requests']:>9} "
              f"{r['fetched_vs_file']:>21.3f}")
    cap = f", each request capped at {args.mb_per_s:g} MB/s" if args.mb_per_s else ""
    print(f"zero-cost model, CPU ({machine()}){cap}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "rasters on a server (bench_remote.py)", "machine": machine(),
            "files": args.files, "size": args.size, "scene": args.scene,
            "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
