"""Folders of small tiles: `run_batch` against a strict one-by-one loop, and with its batch
sharing switched off.

Both sides load the model once. The loop opens each file, reads it, runs it and writes it
before it touches the next. `run_batch` (what `crossearth segment FOLDER` runs) reads the next
files while the current ones are on the model, keeps the manifest, and runs files too small
to fill a batch together (one forward pass for several files); "without groups" is the same
with that sharing switched off (each file its own forward pass, as before it existed).
Interleaved repeats, best of each.

    python benchmarks/bench_batch.py                    # 50 tiles of 512², tiny model
    python benchmarks/bench_batch.py --model zero --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from scenes import ZeroCostHead, machine, tiny_checkpoint, write_tiles


@contextlib.contextmanager
def groups(session, on: bool):
    """``run_batch`` as it is (``on``) or with no scene sharing a forward pass."""
    if on:
        yield
        return
    session.group_key = lambda scene: None
    try:
        yield
    finally:
        del session.group_key


def main() -> None:
    from crossearth_cli.batch import Manifest, expand_inputs, run_batch
    from crossearth_cli.engine import ModelSpec, SegmentSettings, Session
    from crossearth_cli.loading import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--model", choices=["tiny", "zero"], default="tiny")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crossearth-batch-"))
    tiles = write_tiles(work / "tiles", args.files, args.size)
    if args.model == "tiny":
        spec = resolve_model(checkpoint=tiny_checkpoint(work / "tiny.pth"))
    else:
        spec = ModelSpec(module=ZeroCostHead(6), class_names=[f"c{i}" for i in range(6)])
    items = expand_inputs([str(tiles)])
    template = SegmentSettings(input=Path("."), output=Path("x.tif"), device="cpu",
                               overwrite=True)
    loop_s, alone_s, batch_s = [], [], []
    with Session(spec, "cpu", "fp32", 4) as session:
        for _ in range(args.repeats):
            out = work / "loop"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            t0 = time.perf_counter()
            for it in items:
                s = SegmentSettings(input=it.path, output=out / f"{it.path.stem}_classes.tif",
                                    device="cpu", overwrite=True)
                session.run(session.prepare(s))
            loop_s.append(time.perf_counter() - t0)

            for grouped, times in ((False, alone_s), (True, batch_s)):
                out = work / "batch"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                with groups(session, grouped):
                    result = run_batch(items, out, template, session, ["classes"], "bench",
                                       Manifest(out))
                times.append(time.perf_counter() - t0)
                assert len(result.done) == len(items), result.failed
    loop, alone, batch = min(loop_s), min(alone_s), min(batch_s)
    report = {"benchmark": "folders of small files (issues 5, 6)", "machine": machine(),
              "files": args.files, "size": args.size, "model": args.model,
              "loop_s": round(loop, 3), "batch_without_groups_s": round(alone, 3),
              "batch_s": round(batch, 3), "speedup": round(loop / batch, 3),
              "groups_speedup": round(alone / batch, 3), "all_loop_s": loop_s,
              "all_batch_without_groups_s": alone_s, "all_batch_s": batch_s}
    print(f"{'approach':<44} {'seconds':>8} {'files/s':>8}")
    for name, t in (("one file after another (model loaded once)", loop),
                    ("run_batch without groups (prefetch only)", alone),
                    ("run_batch (prefetch, shared batches)", batch)):
        print(f"{name:<44} {t:>8.2f} {args.files / t:>8.2f}")
    print(f"run_batch: {loop / batch:.2f}× the loop, groups {alone / batch:.2f}× "
          f"({args.model} model, {machine()})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
