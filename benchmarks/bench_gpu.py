"""(d) The GPU benchmark behind benchmarks/gpu.sh: ViT-L model-only and end-to-end figures.

Reports, for a random-weight ViT-L CrossEarth (the real architecture; weights do not change
the work):
- model-only tiles/s at 512 and 1024 in bf16 autocast and fp32, with achieved TFLOP/s from
  the reference's 0.89 TFLOP per 512² tile and 4.8 TFLOP per 1024² tile, and peak memory;
- the top CUDA kernels of one bf16 batch (where the time goes);
- torch.compile against eager for 512 bf16 (when time allows);
- 512 bf16 with the later GPU changes switched off (PyTorch deformable attention, per-call
  weight casts, F.interpolate mask resizes) against now, and the fused kernel's
  largest float32 difference from the PyTorch path on this GPU;
- end-to-end Mpx/s of `segment` on a synthetic 16k² scene, against model-only at the same
  batch and precision, and again with the finished rows copied back synchronously (as
  before the asynchronous copy-back); where the host still waits for the GPU during a
  `segment` run (CUDA's sync debug mode, a 4096² scene);
- a folder of 128 single-tile 512² files through `run_batch` (what `crossearth segment
  FOLDER` runs), with and without files sharing forward passes, against model-only at
  batch 16 and at batch 1.
Each step is written to the JSON as soon as it finishes, so a cut-off run keeps what it did.

    python benchmarks/bench_gpu.py --json $OUT/gpu.json
    python benchmarks/bench_gpu.py --cpu-smoke --json /tmp/smoke.json   # tiny model on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from scenes import (
    TFLOP_PER_TILE,
    machine,
    profiled,
    random_model,
    sync,
    work_dir,
    write_scene,
    write_tiles,
)

from crossearth_cli.cuda_graphs import ENV as GRAPHS_ENV
from crossearth_cli.engine import Predictor
from crossearth_cli.model.attention import SDPA_ENV
from crossearth_cli.model.ms_deform_attn import KERNEL_ENV
from crossearth_cli.model.optional_kernel import env_set
from crossearth_cli.model.precision import autocast_weights
from crossearth_cli.raster.windows import tile_grid


def timed(net, x, precision: str, device: str, seconds: float, warmup: int = 2,
          as_segment_runs: bool = True) -> dict:
    """Tiles/s of ``net`` on ``x``; ``as_segment_runs``: with the weights prepared for autocast
    as `segment` prepares them (crossearth_cli.model.precision)."""
    dev = torch.device(device).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if as_segment_runs:
        net = autocast_weights(net, dtype)
    ctx = torch.autocast(dev, dtype=dtype) if dtype else torch.autocast(dev, enabled=False)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), ctx:
        for _ in range(warmup):
            net(x)
        sync(device)
        n, t0 = 0, time.perf_counter()
        while True:
            net(x)
            n += 1
            if n >= 2 and time.perf_counter() - t0 > seconds:
                sync(device)
                if time.perf_counter() - t0 > seconds:
                    break
        sync(device)
        elapsed = time.perf_counter() - t0
    row = {"precision": precision, "batch": x.shape[0], "batches": n,
           "tiles_per_s": round(n * x.shape[0] / elapsed, 3)}
    if dev == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def kernel_profile(net, x, device: str, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    net = autocast_weights(net, torch.bfloat16)
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        net(x)
        sync(device)
        with profile(activities=acts) as prof:
            net(x)
            sync(device)
    def self_time(e) -> float:
        if device.startswith("cuda"):
            return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    rows = []
    for e in sorted(prof.key_averages(), key=self_time, reverse=True)[:top]:
        rows.append({"name": e.key[:80], "ms": round(self_time(e) / 1000, 3), "calls": e.count})
    return rows


def end_to_end(net, size: int, device: str, batch: int, precision: str, work: Path,
               tile: int, dtype: str = "uint8") -> dict:
    from crossearth_cli.engine import ModelSpec, SegmentSettings, segment

    src = work / f"scene_{size}{'' if dtype == 'uint8' else '_' + dtype}.tif"
    t0 = time.perf_counter()
    if not src.exists():
        write_scene(src, size, dtype=dtype)
    make_s = time.perf_counter() - t0
    spec = ModelSpec(module=net, class_names=[f"c{i}" for i in range(net.num_classes)],
                     crop=tile, stride=round(tile * 2 / 3), label="random ViT-L")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = segment(SegmentSettings(input=src, output=work / "classes.tif", overwrite=True,
                                batch_size=batch, device=device, precision=precision), spec)
    seconds = time.perf_counter() - t0
    # the scene's windows, each counted once: a scene wider than the stripe width runs the
    # tiles on a stripe edge twice (r.tiles), which is work done, not work the scene needs
    windows = sum(len(row) for row in tile_grid(size, size, tile, spec.stride))
    row = {"scene": f"{size}x{size}", "scene_write_s": round(make_s, 1),
           "seconds": round(seconds, 2), "scene_s": round(r.seconds, 2),
           "windows": windows, "tiles": r.tiles, "tiles_skipped": r.tiles_skipped,
           "tiles_per_s": round(windows / r.seconds, 3),  # what end-to-end ratios compare
           "tiles_run_per_s": round(r.tiles / r.seconds, 3),
           "mpx_per_s": round(r.mpx_per_s, 2), "batch": r.batch_size, "precision": r.precision}
    if device.startswith("cuda"):
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def pytorch_attention():
    """Deformable attention on its PyTorch path (grid_sample), as before the Triton kernel."""
    return env_set(KERNEL_ENV, "pytorch")


def cuda_graphs():
    """`segment` with the model's forward replayed from CUDA graphs (crossearth_cli/cuda_graphs.py,
    opt-in until measured)."""
    return env_set(GRAPHS_ENV, "1")


def cudnn_attention():
    """SDPA tries cuDNN's attention kernels first (crossearth_cli/model/attention.py, opt-in
    until measured). ``max_abs_diff_vs_now`` of 0 would mean the same kernel still ran."""
    return env_set(SDPA_ENV, "cudnn")


def applied(patches) -> contextlib.ExitStack:
    """Every context of ``patches`` (callables returning one) entered, for a ``with``."""
    stack = contextlib.ExitStack()
    for p in patches:
        stack.enter_context(p())
    return stack


@contextlib.contextmanager
def interpolated_mask_resizes():
    """The decoder's mask resizes through F.interpolate, as before shrink_bilinear."""
    from crossearth_cli.model import head

    shrink = head.shrink_bilinear
    head.shrink_bilinear = lambda x, size: F.interpolate(
        x.float(), size=size, mode="bilinear", align_corners=False)
    try:
        yield
    finally:
        head.shrink_bilinear = shrink


def counted_host_waits(fn) -> tuple[object, dict]:
    """``fn()`` with CUDA's sync debug mode on: its result, and how many times and where the
    host waited for the GPU (each wait drains the GPU's queue of work)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    return out, {"host_waits": sum(where.values()),
                 "by_line": dict(sorted(where.items(), key=lambda kv: -kv[1])[:15])}


def host_waits(net, size: int, device: str, batch: int, work: Path, tile: int,
               dtype: str = "uint8") -> dict:
    """`segment` of a ``size``² scene of ``dtype`` (uint16 is stretched to 0-255 on the
    device, per batch) with CUDA's sync debug mode on: where the host waited for the GPU."""
    if not device.startswith("cuda"):
        return {"skipped": "CUDA only"}
    row, waits = counted_host_waits(
        lambda: end_to_end(net, size, device, batch, "bf16", work, tile, dtype=dtype))
    return {"tiles": row["tiles"], "dtype": dtype, **waits}


def folder_of_tiles(net, files: int, size: int, device: str, batch: int, work: Path,
                    profile: bool = False) -> dict:
    """`crossearth segment FOLDER` (batch.run_batch) on ``files`` tiles of ``size``², one tile
    per file, as datasets of evaluation crops are laid out: as it runs (files that cannot fill
    a batch share forward passes) and with that sharing off (one tile per forward pass).
    ``profile``: the shared run under cProfile too (the main thread: where its time per file
    goes), after the timed runs."""
    from bench_batch import groups

    from crossearth_cli.batch import Manifest, expand_inputs, run_batch
    from crossearth_cli.engine import ModelSpec, SegmentSettings, Session

    tiles = work / f"tiles_{size}"
    if not tiles.exists():
        write_tiles(tiles, files, size)
    spec = ModelSpec(module=net, class_names=[f"c{i}" for i in range(net.num_classes)],
                     crop=size, stride=round(size * 2 / 3), label="random ViT-L")
    template = SegmentSettings(input=Path("."), output=Path("x.tif"), overwrite=True,
                               device=device, precision="bf16", batch_size=batch)
    out = work / "folder_out"
    row: dict = {"files": files, "tile": size}
    with Session(spec, device, "bf16", batch) as session:
        items = expand_inputs([str(tiles)])
        run_batch(items[:2], out, template, session, ["classes"], "warm", Manifest(out))
        for grouped in (False, True):
            shutil.rmtree(out)
            with groups(session, grouped):
                t0 = time.perf_counter()
                result = run_batch(items, out, template, session, ["classes"], "bench",
                                   Manifest(out))
                seconds = time.perf_counter() - t0
            if result.failed:
                raise RuntimeError(f"{len(result.failed)} files failed: "
                                   f"{result.failed[0].reason}")
            name = "tiles_per_s" if grouped else "without_groups_tiles_per_s"
            row[name] = round(len(result.done) / seconds, 2)
        if device.startswith("cuda"):  # where the host still waits, per file
            shutil.rmtree(out)
            _, waits = counted_host_waits(lambda: run_batch(
                items, out, template, session, ["classes"], "bench", Manifest(out)))
            row["host_waits"] = waits
        if profile:
            shutil.rmtree(out)
            row["profiled"] = profiled(lambda: {"files": len(run_batch(
                items, out, template, session, ["classes"], "bench", Manifest(out)).done)})
    x = torch.randn(1, 3, size, size, device=device)
    row["model_only_batch1_tiles_per_s"] = timed(
        autocast_weights(net, torch.bfloat16), x, "bf16", device,
        1.0 if device == "cuda" else 0.2, as_segment_runs=False)["tiles_per_s"]
    return row


@contextlib.contextmanager
def synchronous_rows():
    """Finished rows copied back with a host wait per tile row, as before the asynchronous
    copy-back (crossearth_cli/raster/accumulator.py)."""
    from crossearth_cli.raster.accumulator import RowBandAccumulator

    init = RowBandAccumulator.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.deferred = False

    RowBandAccumulator.__init__ = patched
    try:
        yield
    finally:
        RowBandAccumulator.__init__ = init


@contextlib.contextmanager
def masks_resized_per_layer():
    """Each decoder layer's B×Q×H4×W4 mask logits resized to the level (mmdet's order), as
    before the mask features were resized once per level."""
    from crossearth_cli.model import head

    resize = head.level_mask_features
    head.level_mask_features = lambda features, size: features
    try:
        yield
    finally:
        head.level_mask_features = resize


@contextlib.contextmanager
def before_gpu_changes():
    """The model without the GPU changes of issue 6's later sessions that can be switched
    off (the caller also passes the float32 model, whose weights autocast casts at every
    call). The removal of host-device waits stays: "before" is a little faster than the
    code before it was."""
    from crossearth_cli.model.backbone import FUSED_VIT
    from crossearth_cli.model.head import FUSED_SEMANTIC

    with (pytorch_attention(), interpolated_mask_resizes(), masks_resized_per_layer(),
          FUSED_VIT.switched_off(), FUSED_SEMANTIC.switched_off(), patch_convolution()):
        yield


@contextlib.contextmanager
def patch_convolution():
    """The patch embedding as the convolution on CUDA too, as before its GEMM path."""
    from crossearth_cli.model.backbone import PatchEmbed

    forward = PatchEmbed.forward
    PatchEmbed.forward = lambda self, x, gemm=None: forward(self, x, gemm=False)
    try:
        yield
    finally:
        PatchEmbed.forward = forward


def before_after(net, batch: int, device: str, seconds: float) -> dict:
    """Model-only 512² bf16, the code as it was against the code as it is, side by side,
    with the fused kernel's largest float32 difference from the PyTorch path on this GPU."""
    from crossearth_cli.model.msda_triton import check

    x = torch.randn(batch, 3, 512, 512, device=device)
    now = autocast_weights(net, torch.bfloat16)  # as segment runs it
    with before_gpu_changes():
        before = timed(net, x, "bf16", device, seconds, as_segment_runs=False)
    after = timed(now, x, "bf16", device, seconds, as_segment_runs=False)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        with before_gpu_changes():
            want = net(x).argmax(1)
        got = now(x).argmax(1)
    return {"before_tiles_per_s": before["tiles_per_s"], "after_tiles_per_s":
            after["tiles_per_s"], "speedup": round(after["tiles_per_s"] /
                                                   before["tiles_per_s"], 3),
            "class_agreement": round((want == got).float().mean().item(), 5),
            "fused_kernel_max_abs_diff_fp32": check(device)}


class StepLog:
    """A benchmark's report: each step runs under a time budget (later steps are skipped),
    an exception is recorded and the run goes on, and the JSON is rewritten after every step
    so a cut-off run keeps what it did."""

    def __init__(self, report: dict, json_path: Path | None, budget: float,
                 only: str | None = None):
        """``only``: a regular expression; steps whose names it does not find are not run."""
        self.report, self.json_path, self.budget = report, json_path, budget
        self.only = re.compile(only) if only else None
        self.t_start = time.perf_counter()
        for key in ("steps", "errors", "step_seconds"):
            report.setdefault(key, {})

    def save(self) -> None:
        if self.json_path:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            self.json_path.write_text(json.dumps(self.report, indent=2) + "\n")

    def selects(self, *names: str) -> bool:
        """Whether ``only`` lets any of these steps run (to skip preparing for none)."""
        return self.only is None or any(self.only.search(n) for n in names)

    def __call__(self, name: str, fn, needs: float = 0.0):
        """Run ``fn`` as step ``name``; its result (None if skipped or failed). ``needs``:
        seconds the step is expected to take (a compilation), so that it is skipped rather
        than started when the budget cannot hold it."""
        if not self.selects(name):
            self.report.setdefault("not_selected", []).append(name)
            return None
        if time.perf_counter() - self.t_start + needs > self.budget:
            self.report["errors"][name] = "skipped: out of time budget"
            self.save()
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            self.report["errors"][name] = f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
            out = None
        else:
            self.report["steps"][name] = out
        self.report["step_seconds"][name] = round(time.perf_counter() - t0, 1)
        self.save()
        print(f"[{time.perf_counter() - self.t_start:6.1f}s] {name}: {json.dumps(out)}",
              flush=True)
        return out

    def finish(self) -> None:
        """Total time, a last save, and the report without its steps on stdout."""
        self.report["total_seconds"] = round(time.perf_counter() - self.t_start, 1)
        self.save()
        print(json.dumps({k: v for k, v in self.report.items() if k != "steps"}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="dry run on the CPU with the tiny model and small sizes")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=270, help="seconds; later steps are skipped")
    ap.add_argument("--e2e-size", type=int, default=16384)
    ap.add_argument("--quick", action="store_true",
                    help="only model-only and the 16k² end-to-end run (no profile, compile)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --cpu-smoke for a dry run")
    sizes = [64, 128] if smoke else [512, 1024]
    seconds = 0.2 if smoke else 4.0
    report: dict = {"benchmark": "gpu (d)", "machine": machine(), "smoke": smoke,
                    "torch": torch.__version__}
    if not smoke:  # fp32 as `--precision fp32` runs it: torch's defaults (no TF32 matmuls)
        report["gpu"] = torch.cuda.get_device_name(0)
    step = StepLog(report, args.json, args.budget)

    batches = {512: {"bf16": 16, "fp32": 8}, 1024: {"bf16": 4, "fp32": 2}}
    b_auto = Predictor.AUTO_CPU_BATCH if smoke else Predictor.AUTO_MAX_BATCH  # auto's most
    e2e_net = None
    for size in sizes:
        t0 = time.perf_counter()
        net = random_model(smoke, size, device)
        report["steps"][f"build_{size}"] = {
            "parameters": sum(p.numel() for p in net.parameters()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        for precision in ("bf16", "fp32"):
            b = 2 if smoke else batches[size][precision]
            x = torch.randn(b, 3, size, size, device=device)
            row = step(f"model_{size}_{precision}",
                       lambda n=net, x=x, p=precision: timed(n, x, p, device, seconds))
            if row and not smoke:
                tflops = row["tiles_per_s"] * TFLOP_PER_TILE[size]
                row["tflop_s"] = round(tflops, 1)
                step.save()
            del x
        if size == sizes[0]:  # also at the batch `segment` runs: auto picks up to 64
            x = torch.randn(b_auto, 3, size, size, device=device)
            row = step(f"model_{size}_bf16_b{b_auto}",
                       lambda n=net, x=x: timed(n, x, "bf16", device, seconds))
            if row and not smoke:
                row["tflop_s"] = round(row["tiles_per_s"] * TFLOP_PER_TILE[size], 1)
                step.save()
            b = 2 if smoke else batches[size]["bf16"]
            x = torch.randn(b, 3, size, size, device=device)
            if not args.quick:
                step("kernels_512_bf16", lambda n=net, x=x: kernel_profile(n, x, device))
            e2e_net = net
        else:
            del net
            if not smoke:
                torch.cuda.empty_cache()
    e2e = args.e2e_size if not smoke else 128
    work = work_dir("crossearth-gpu-")
    b = 2 if smoke else batches[sizes[0]]["bf16"]
    step("end_to_end", lambda: end_to_end(e2e_net, e2e, device, b, "bf16", work, sizes[0]))

    def end_to_end_synchronous_rows():
        with synchronous_rows():
            return end_to_end(e2e_net, e2e, device, b, "bf16", work, sizes[0])

    step("end_to_end_synchronous_rows", end_to_end_synchronous_rows)  # the copy-back before
    step("folder_of_tiles", lambda: folder_of_tiles(e2e_net, 128 if not smoke else 4,
                                                    sizes[0], device, b, work))
    for dtype in ("uint8", "uint16"):  # uint16: the per-batch stretch on the device
        step(f"end_to_end_host_waits{'' if dtype == 'uint8' else '_' + dtype}",
             lambda d=dtype: host_waits(e2e_net, 4096 if not smoke else 96, device, b, work,
                                        sizes[0], dtype=d))
    if not smoke:  # the model as it was before this GPU changes, same run
        step("model_512_bf16_before_after", lambda: before_after(
            e2e_net, batches[512]["bf16"], device, seconds))
    if not args.quick:
        step("end_to_end_batch_auto",  # the scene of end_to_end, at the batch auto picks
             lambda: end_to_end(e2e_net, e2e, device, "auto", "bf16", work, sizes[0]))
    model_row = report["steps"].get(f"model_{sizes[0]}_bf16")
    e2e_row = report["steps"].get("end_to_end")
    if model_row and e2e_row:
        report["end_to_end_vs_model_only"] = round(
            e2e_row["tiles_per_s"] / model_row["tiles_per_s"], 3)
    auto_row = report["steps"].get("end_to_end_batch_auto")
    model_auto = report["steps"].get(f"model_{sizes[0]}_bf16_b{b_auto}")
    if auto_row and model_auto and auto_row["batch"] == model_auto["batch"]:
        report["end_to_end_auto_vs_model_only"] = round(
            auto_row["tiles_per_s"] / model_auto["tiles_per_s"], 3)
    folder_row = report["steps"].get("folder_of_tiles")
    if model_row and folder_row:
        report["folder_of_tiles_vs_model_only"] = round(
            folder_row["tiles_per_s"] / model_row["tiles_per_s"], 3)
    if not smoke and not args.quick:
        x = torch.randn(batches[512]["bf16"], 3, 512, 512, device=device)

        def compiled():
            t0 = time.perf_counter()
            c = torch.compile(autocast_weights(e2e_net, torch.bfloat16), dynamic=False)
            row = timed(c, x, "bf16", device, seconds, warmup=2)
            row["compile_and_warmup_s"] = round(time.perf_counter() - t0 - seconds, 1)
            return row

        step("compiled_512_bf16", compiled, needs=90)  # ~80 s of compiling on an H200
    step.finish()


if __name__ == "__main__":
    main()
