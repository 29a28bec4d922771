"""Issue 6 checks that can run anywhere: precision agreement, the benchmarks' dry runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import SAMPLE_DATA, per_pixel_spec, random_scene, tiny_model, write_tif

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_spec():
    from crossearth_cli.loading import resolve_model
    from crossearth_cli.model.random_init import tiny_config, write_random_checkpoint

    def make(tmp: Path):
        # the project's tiny model (default seed, as in the demo); see docs/performance.md for
        # how agreement varies between random tiny models
        ckpt = write_random_checkpoint(tmp / "tiny.pth", tiny_config(num_classes=6))
        return resolve_model(checkpoint=ckpt)

    return make


def test_bf16_and_fp32_class_maps_agree(tmp_path, tiny_spec):
    from crossearth_cli.engine import SegmentSettings, segment

    maps = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.tif"
        segment(SegmentSettings(input=SAMPLE_DATA / "rgbn_town.tif", output=out, bands=[4, 1, 2],
                                tile=256, stride=170, precision=precision, device="cpu"),
                tiny_spec(tmp_path))
        with rasterio.open(out) as ds:
            maps[precision] = ds.read(1)
    agree = float(np.mean(maps["fp32"] == maps["bf16"]))
    assert len(np.unique(maps["fp32"])) > 1, "a one-class map would agree trivially"
    assert agree >= 0.99, agree


def cpu_smoke_report(script: str, tmp_path: Path) -> dict:
    """``benchmarks/<script> --cpu-smoke``'s JSON report, after checking it ran cleanly."""
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script),
                           "--cpu-smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert not report["errors"], report["errors"]
    return report


def test_gpu_session_dry_run_on_the_cpu(tmp_path):
    """gpu_session.sh (the prepared candidates, then gpu.sh) as a lent GPU would run it."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--cpu-smoke"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    explore = json.loads((tmp_path / "explore.json").read_text())
    assert not explore["errors"], explore["errors"]
    ran = set(explore["steps"])
    assert {"model_64_now", "model_64_before", "model_64_now_plus_fused_pixel_encoder",
            "model_64_now_plus_cudnn_attention", "end_to_end_now", "end_to_end_cuda_graphs",
            "folder_of_tiles_now", "folder_of_tiles_cuda_graphs"} <= ran
    assert "components_64_now" not in ran and "components_64_now" in explore["not_selected"]
    for name in ("before", "cuda_graphs"):  # (on the CPU, no CUDA graph: the same run)
        row = explore["steps"][f"end_to_end_{name}"]
        assert row["tiles"] > 1 and row["class_agreement_vs_now"] > 0.99
    folder = explore["steps"]["folder_of_tiles_cuda_graphs"]
    assert folder["files"] == 4 and folder["tiles_per_s"] > 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["smoke"] is True and not report["errors"], report["errors"]
    steps = report["steps"]
    for name in ("model_64_bf16", "model_64_fp32", "model_128_bf16", "model_128_fp32"):
        assert steps[name]["tiles_per_s"] > 0
    assert steps["end_to_end"]["tiles"] > 1 and steps["end_to_end"]["tiles_per_s"] > 0
    folder = steps["folder_of_tiles"]  # every single-tile file through run_batch
    assert folder["files"] == 4 and folder["tiles_per_s"] > 0
    assert folder["without_groups_tiles_per_s"] > 0
    assert report["folder_of_tiles_vs_model_only"] > 0


def test_gpu_explore_dry_run_on_the_cpu(tmp_path):
    """gpu_explore.py must still run when a GPU session comes (profile_gpu.py once broke
    unnoticed); on the CPU every CUDA-only switch it flips leaves the model's numbers as they
    are. "before" also undoes reorderings (masks resized after their projection), equal to
    bf16 rounding only: bit-equal on some CPUs, 1 class pixel in 1,024 off on an AMD EPYC."""
    steps = cpu_smoke_report("gpu_explore.py", tmp_path)["steps"]
    assert steps["model_64_now"]["tiles_per_s"] > 0
    assert steps["model_64_before"]["class_agreement_vs_now"] >= 0.99
    for name in ("now_but_eager_vit", "now_but_eager_semantic",
                 "now_but_patch_convolution",
                 "now_plus_fused_pixel_encoder",
                 "now_plus_fused_pixel_encoder_sampling_in_kernel",
                 "now_plus_cudnn_attention"):  # no CUDA path on a CPU
        assert steps[f"model_64_{name}"]["max_abs_diff_vs_now"] == 0.0, name
    assert steps["end_to_end_now"]["tiles"] > 1


def test_head_benchmark_times_both_mask_orders(tmp_path):
    """bench_head.py: one command, a table and JSON, both orders of the decoder's masks."""
    out = tmp_path / "head.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_head.py"),
                           "--model", "tiny", "--size", "64", "--batch", "2", "--repeats", "1",
                           "--precision", "bf16", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(row["best_ms"] > 0 for row in rows.values())
    assert "logits resized per layer (mmdet)" in proc.stdout


def test_model_benchmark_runs_segment_beside_model_only(tmp_path):
    """bench_model.py (c) with --end-to-end: one command, a table and JSON, `segment` on its
    own synthetic scene with the same model, batch and precision as the model-only row."""
    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"),
                           "--model", "tiny", "--size", "128", "--batch", "2", "--modes",
                           "fp32", "--repeats", "1", "--end-to-end", "300", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,), (e2e,) = report["results"], report["end_to_end"]
    assert row["tiles_per_s"] > 0 and row["finite"]
    assert e2e["scene"] == "300x300" and e2e["tiles"] > 1 and e2e["batch"] == 2
    assert e2e["vs_model_only"] == pytest.approx(e2e["tiles_per_s"] / row["tiles_per_s"])
    assert "of model-only" in proc.stdout


def test_model_benchmark_quotes_vit_l_against_a_measured_matmul(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_model

    measured = []

    def fake_matmul(device, dtype, n):
        measured.append(dtype)
        return {torch.float32: 0.2, torch.bfloat16: 0.4}[dtype]

    monkeypatch.setattr(bench_model, "matmul_tflops", fake_matmul)
    rows = [{"mode": "fp32", "tiles_per_s": 0.1}, {"mode": "bf16-autocast", "tiles_per_s": 0.2},
            {"mode": "bf16-autocast+compile", "tiles_per_s": 0.3}]
    bench_model.add_compute_rates(rows, 512, "cpu", "vit-l")
    assert measured == [torch.float32, torch.bfloat16]  # once per dtype
    assert [round(r["tflop_s"], 3) for r in rows] == [0.089, 0.178, 0.267]
    assert [round(r["share_of_matmul"], 4) for r in rows] == [0.445, 0.445, 0.6675]
    tiny_rows = [{"mode": "fp32", "tiles_per_s": 5.0}]
    bench_model.add_compute_rates(tiny_rows, 512, "cpu", "tiny")  # no FLOP count for it
    assert "tflop_s" not in tiny_rows[0]


@pytest.mark.parametrize("shape", [(2, 3, 64, 80), (1, 3, 70, 50)])  # 70, 50: a remainder
def test_patch_embedding_as_one_gemm_matches_the_convolution(shape):
    """PatchEmbed's CUDA path, the patch convolution as a GEMM over the image cut into
    patches, gives the convolution's tokens, in float32 and under bf16 autocast."""
    import torch

    from crossearth_cli.model.backbone import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(16, 32).eval()
    x = torch.randn(shape)
    for autocast in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            want = embed(x).float()  # the CPU takes the convolution
            got = embed(x, gemm=True).float()
        assert got.shape == want.shape == (shape[0], (shape[2] // 16) * (shape[3] // 16), 32)
        tolerance = 2e-2 if autocast else 1e-5  # bf16 rounding of another summation order
        assert (got - want).abs().max() <= tolerance * want.abs().max(), autocast


def test_naive_benchmark_forms_place_every_window_where_segment_does(tmp_path):
    """Benchmark (b)'s two naive forms (mmseg's padded canvas, sliced adds) run here with the
    zero-cost head, whose scores follow the pixels: a window added at the wrong place changes
    the class map. Both forms and `segment` must give the same map. Timing is not checked."""
    out = tmp_path / "naive.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_naive.py"),
                           "--sizes", "700", "--workdir", str(tmp_path), "--model", "zero",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tiles"] == 4
    assert set(row["speedup"]) == {"mmseg", "sliced"}
    assert row["naive_forms_agree"] is True
    assert min(row["agreement_with_segment"].values()) > 0.999


def test_benchmark_peak_memory_is_the_measured_process_own():
    """Benchmark (b) runs each side in a child process. A child started by vfork + exec
    inherits its parent's peak in ``ru_maxrss``: a parent that had just written a 16k² scene
    made `segment`'s peak look ~100 MB larger. The benchmarks' reading must not."""
    child = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
             "from scenes import peak_rss_mb; print(peak_rss_mb())")
    parent = textwrap.dedent(
        f"""
        import subprocess, sys
        import numpy as np
        held = np.ones(2**31 // 8)  # 2 GiB, touched: the parent's peak
        print(subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True,
                             check=True).stdout)
        """
    )
    proc = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child_peak_mb = float(proc.stdout.split()[-1])
    # the child imports torch and rasterio (~0.3-0.8 GB), far below the parent's 2 GiB
    assert 50 < child_peak_mb < 1500, child_peak_mb


def test_fused_deformable_attention_matches_the_pytorch_path():
    """The Triton kernel CUDA runs use, run here by Triton's interpreter: same outputs as the
    PyTorch path of `MSDeformAttn` (points off the map included) to float32 rounding."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "crossearth_cli.model.msda_triton"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff = float(proc.stdout.strip().rsplit(" ", 1)[-1])
    assert diff < 1e-5


def test_fused_vit_elementwise_kernels_match_eager_autocast():
    """crossearth_cli/model/vit_triton.py (what CUDA runs use), run by Triton's interpreter:
    each kernel gives the bits of the eager autocast ops it replaces (LayerNorm up to its last
    bit), and a small CrossEarth with a visible Rein and LayerScale gives the same features and
    classes."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "crossearth_cli.model.vit_triton"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, row in report["kernels"].items():
        for key, value in row.items():
            if key.endswith("equal"):
                assert value is True, (name, key)
            elif key == "equal_share":
                assert value >= 0.99, (name, value)
            else:  # the LayerNorm outputs: at most a bf16 step of ~1-sized values apart
                assert value <= 2**-7, (name, key, value)
    assert report["model"]["maps_max_rel_diff"] < 1e-3
    assert report["model"]["class_agreement"] == 1.0


def test_fused_semantic_inference_matches_the_eager_path():
    """crossearth_cli/model/semantic_triton.py (what CUDA runs use), run by Triton's
    interpreter: Mask2Former's
    semantic scores in one kernel equal the eager upsample-sigmoid-matmul to float32 rounding,
    for a ×4 bf16 map and an odd-sized, cropped one."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "crossearth_cli.model.semantic_triton"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, row in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert row["shape_equal"], name
        assert row["max_abs_diff"] < 1e-5, (name, row)
        assert row["class_agreement"] == 1.0, (name, row)


def test_fused_deformable_attention_is_chosen_only_where_it_applies(monkeypatch):
    """CPU tensors, an explicit fused=False, CROSSEARTH_DEFORM_ATTN=pytorch or a head width
    that is not a power of two all keep the PyTorch path."""
    import torch

    from crossearth_cli.model import ms_deform_attn
    from crossearth_cli.model.ms_deform_attn import MSDeformAttn

    calls = []
    monkeypatch.setattr(ms_deform_attn, "_import_fused", lambda: lambda *a: calls.append(a))
    assert ms_deform_attn.fused_kernel(32) is not None
    assert ms_deform_attn.fused_kernel(24) is None
    monkeypatch.setenv("CROSSEARTH_DEFORM_ATTN", "pytorch")
    assert ms_deform_attn.fused_kernel(32) is None
    monkeypatch.delenv("CROSSEARTH_DEFORM_ATTN")
    layer = MSDeformAttn(embed_dims=64, num_heads=2, num_levels=2, num_points=2)
    shapes = [(2, 2), (4, 4)]
    query = torch.randn(1, 20, 64)
    ref = torch.rand(1, 20, 2, 2)
    with torch.no_grad():
        out = layer(query, query, ref, shapes)  # CPU: the PyTorch path
        assert out.shape == query.shape and not calls
        with pytest.raises(AttributeError):  # the stand-in kernel returns None
            layer(query, query, ref, shapes, fused=True)
    assert len(calls) == 1


def test_a_fused_kernel_that_fails_falls_back_once_but_out_of_memory_still_raises(
        monkeypatch):
    """No C compiler for Triton, an unwritable cache...: the run goes on on the PyTorch path
    (same result), says so once and does not try again; out-of-memory must reach the batch
    halving instead."""
    import torch

    from crossearth_cli.model import ms_deform_attn
    from crossearth_cli.model.ms_deform_attn import MSDeformAttn

    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(ms_deform_attn, "_import_fused", lambda: broken)
    monkeypatch.setattr(ms_deform_attn, "_FUSED_FAILED", [])
    layer = MSDeformAttn(embed_dims=64, num_heads=2, num_levels=2, num_points=2)
    shapes = [(2, 2), (4, 4)]
    query, ref = torch.randn(1, 20, 64), torch.rand(1, 20, 2, 2)
    with torch.no_grad():
        want = layer(query, query, ref, shapes, fused=False)
        with pytest.warns(RuntimeWarning, match="C compiler"):
            got = layer(query, query, ref, shapes, fused=True)
        again = layer(query, query, ref, shapes, fused=True)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert len(calls) == 1 and ms_deform_attn.fused_kernel(32) is None

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(ms_deform_attn, "_import_fused", lambda: out_of_memory)
    monkeypatch.setattr(ms_deform_attn, "_FUSED_FAILED", [])
    with torch.no_grad(), pytest.raises(torch.cuda.OutOfMemoryError):
        layer(query, query, ref, shapes, fused=True)
    assert not ms_deform_attn._FUSED_FAILED


def test_weights_stored_in_the_autocast_dtype_give_the_same_scores():
    """autocast_weights: bit-identical scores under bf16 autocast, float32 kept where the
    model does float32 maths with a weight, and the original model left untouched."""
    import torch

    from crossearth_cli.model.precision import autocast_weights, castable_parameters

    net = tiny_model(num_classes=6, seed=3)
    fast = autocast_weights(net, torch.bfloat16)
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = net(x), fast(x)
    assert torch.equal(want, got)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    cast = {id(p) for p in castable_parameters(fast)}
    assert {p.dtype for p in fast.parameters() if id(p) in cast} == {torch.bfloat16}
    assert {p.dtype for p in fast.parameters() if id(p) not in cast} == {torch.float32}
    assert fast.backbone.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    attn = fast.decode_head.pixel_decoder.encoder.layers[0].self_attn
    assert attn.sampling_offsets.weight.dtype == torch.float32
    assert fast.backbone.reins.mlp_token2feat.weight.dtype == torch.float32
    assert fast.backbone.pos_embed is net.backbone.pos_embed  # shared, not copied
    assert autocast_weights(net, None) is net


def test_decoder_mask_shrink_matches_bilinear_interpolation():
    """shrink_bilinear reads whole-factor resizes off by slicing; it must give what
    F.interpolate gives (float32, ulp-level on the CPU, whose kernel adds in another order),
    and fall back to it for other sizes."""
    import torch
    import torch.nn.functional as F

    from crossearth_cli.model.head import shrink_bilinear

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 5, 48, 36) * 4).to(dtype)
        for size in [(24, 18), (12, 12), (6, 9), (3, 4), (48, 36), (16, 12), (1, 1),
                     (20, 18), (7, 5)]:
            want = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
            got = shrink_bilinear(x, size)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_compile_is_skipped_on_the_cpu_with_one_note(tmp_path, tiny_spec):
    """torch.compile measured slower on the CPU: --compile keeps the eager model there and
    says so once per session, not once per file."""
    import torch

    from crossearth_cli.engine import COMPILE_CPU_NOTE, SegmentSettings, Session

    spec = tiny_spec(tmp_path)
    notes = []

    def events(kind, data):
        if kind == "note":
            notes.append(data["message"])

    with Session(spec, device="cpu", compile=True) as session:
        assert not isinstance(spec.module, torch._dynamo.eval_frame.OptimizedModule)
        for name in ("a", "b"):
            settings = SegmentSettings(input=SAMPLE_DATA / "rgbn_town.tif", bands=[4, 1, 2],
                                       output=tmp_path / f"{name}.tif", device="cpu",
                                       compile=True)
            session.run(session.prepare(settings), events)
    assert notes.count(COMPILE_CPU_NOTE) == 1


ALLOCATOR_PROBE = """
import ctypes
from crossearth_cli.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(16 << 20)
mapped = libc.mallinfo2().hblkhd >= 16 << 20  # served by its own mmap
libc.free(block)
kept = libc.mallinfo2().fordblks >= 16 << 20  # still in the heap after free, for reuse
print(applied, mapped, kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cpu_runs_keep_freed_model_temporaries_in_the_heap():
    """A 16 MB block (the size of the model's temporaries) comes from the heap and stays
    there after free; the user's own MALLOC_* setting wins over ours."""
    def probe(**env):
        proc = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=120)
        if "mallinfo2" in proc.stderr:
            pytest.skip("not glibc ≥ 2.33")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()

    assert probe() == ["True", "False", "True"]
    assert probe(MALLOC_MMAP_THRESHOLD_="131072") == ["False", "True", "False"]


def test_outputs_are_compressed_by_several_threads_where_cores_allow(tmp_path, monkeypatch):
    """Beside a GPU model, GDAL compresses a block row's blocks in parallel (one thread per
    output capped a GPU run at ~22 Mpx/s); beside a CPU model, which has the cores, one thread.
    The pixels read back are the same, for a plain tiled output and a COG."""
    from affine import Affine

    from crossearth_cli.engine import SegmentSettings, segment
    from crossearth_cli.raster import writer

    monkeypatch.delenv("CROSSEARTH_COMPRESS_THREADS", raising=False)
    for cores, threads in ((2, 1), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)),
                            raising=False)
        assert writer.compression_threads() == threads
        assert writer.compression_threads(model_on_cpu=True) == 1
    monkeypatch.setenv("CROSSEARTH_COMPRESS_THREADS", "3")
    assert writer.compression_threads(model_on_cpu=True) == 3
    seen = []
    init = writer.GeoTiffSink.__init__

    def recording(self, spec, *args):
        seen.append(spec.threads)
        init(self, spec, *args)

    monkeypatch.setattr(writer.GeoTiffSink, "__init__", recording)
    src = write_tif(tmp_path / "in.tif", random_scene(64, 64, seed=0))
    segment(SegmentSettings(input=src, output=tmp_path / "c.tif", device="cpu",
                            confidence=tmp_path / "conf.tif"), per_pixel_spec())
    assert seen == [3, 3]  # what `segment` gives its outputs
    monkeypatch.undo()
    monkeypatch.setenv("CROSSEARTH_COMPRESS_THREADS", "3")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 6, (1100, 700), dtype=np.uint8)
    for cog in (False, True):
        spec = writer.RasterSpec(path=tmp_path / f"out_{cog}.tif", count=1, dtype="uint8",
                                 nodata=255, cog=cog, threads=3)
        assert writer._creation_options(spec)["num_threads"] == 3
        sink = writer.GeoTiffSink(spec, *rows.shape, "EPSG:32631",
                                  Affine(0.5, 0, 500000, 0, -0.5, 5800000))
        for y in range(0, rows.shape[0], 100):
            sink.write_rows(y, rows[y : y + 100])
        sink.commit()
        with rasterio.open(spec.path) as ds:
            assert np.array_equal(ds.read(1), rows)
    none = writer.RasterSpec(path=tmp_path / "raw.tif", count=1, dtype="uint8", nodata=255,
                             compress="none", threads=3)
    assert "num_threads" not in writer._creation_options(none)
    one = writer.RasterSpec(path=tmp_path / "one.tif", count=1, dtype="uint8", nodata=255)
    assert "num_threads" not in writer._creation_options(one)


def test_fused_vit_is_chosen_only_where_it_applies_and_falls_back_once(monkeypatch):
    """The backbone takes vit_triton's path only under autocast with no gradient on CUDA (or
    Triton's interpreter) and not with CROSSEARTH_FUSED_VIT=0; kernels that cannot compile or
    launch leave the eager blocks (same result) after one warning; out-of-memory still reaches
    the batch halving."""
    import torch

    from crossearth_cli.model import CrossEarth
    from crossearth_cli.model import backbone as backbone_module
    from crossearth_cli.model.random_init import random_state_dict, tiny_config

    config = tiny_config()
    net = CrossEarth(config)
    net.load_state_dict(random_state_dict(config, seed=0))
    vit = net.eval().backbone
    x = torch.randn(1, 3, 64, 64)
    calls = []

    def recorder(module, images):
        calls.append(images.shape)
        return ["fused"]

    kernel = backbone_module.FUSED_VIT
    monkeypatch.setattr(kernel, "load", lambda: recorder)
    monkeypatch.setattr(kernel, "failed", [])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert vit.forward_features(x) != ["fused"]  # CPU: eager
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert vit.forward_features(x) == ["fused"]
            monkeypatch.setenv("CROSSEARTH_FUSED_VIT", "0")
            assert vit.forward_features(x) != ["fused"]
            monkeypatch.delenv("CROSSEARTH_FUSED_VIT")
            assert vit.forward_features(x, use_rein=False) != ["fused"]
        assert vit.forward_features(x) != ["fused"]  # no autocast: float32 eager
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients recorded
        assert vit.forward_features(x) != ["fused"]
    assert len(calls) == 1

    def broken(module, images):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernel, "load", lambda: broken)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = vit.forward_features(x, fused=False)
        with pytest.warns(RuntimeWarning, match="C compiler"):
            got = vit.forward_features(x)
        again = vit.forward_features(x)
    assert all(torch.equal(a, b) for a, b in zip(got + again, want + want))
    assert not kernel.enabled()

    def out_of_memory(module, images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(kernel, "load", lambda: out_of_memory)
    monkeypatch.setattr(kernel, "failed", [])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            vit.forward_features(x)
    assert not kernel.failed


def test_fused_semantic_inference_is_chosen_only_on_cuda_or_the_interpreter(monkeypatch):
    """head.semantic_scores takes semantic_triton's kernel for CUDA tensors (here: Triton's
    interpreter) with no gradient, unless CROSSEARTH_FUSED_SEMANTIC=0."""
    import torch

    from crossearth_cli.model import head

    calls = []
    monkeypatch.setattr(head.FUSED_SEMANTIC, "load", lambda: lambda *a: calls.append(a) or "k")
    monkeypatch.setattr(head.FUSED_SEMANTIC, "failed", [])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cls, masks = torch.randn(1, 3, 5), torch.randn(1, 3, 4, 4)
    with torch.inference_mode():
        assert torch.is_tensor(head.semantic_scores(cls, masks, size=(16, 16)))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert head.semantic_scores(cls, masks, size=(16, 16)) == "k"
        with head.FUSED_SEMANTIC.switched_off():
            assert torch.is_tensor(head.semantic_scores(cls, masks, size=(16, 16)))
    assert torch.is_tensor(head.semantic_scores(cls, masks, size=(16, 16)))  # gradients on
    assert len(calls) == 1


def test_gpu_diagnose_dry_run_on_the_cpu(tmp_path):
    """gpu_diagnose.py (float32 faithfulness of each fused path, what caps segment) runs."""
    report = cpu_smoke_report("gpu_diagnose.py", tmp_path)
    assert set(report["steps"]["faithfulness"]) == {"now", "eager_vit", "eager_semantic",
                                                    "patch_convolution", "before"}
    assert report["steps"]["segment_zero_cost"]["tiles"] > 1
    assert "function calls" in report["steps"]["segment_now_profiled"]["profile"]


@pytest.mark.parametrize("eager_first", [True, False])
def test_torch_compile_traces_the_whole_model_in_one_graph(eager_first):
    """``--compile`` on CUDA: dynamo must see the model as one graph (the Rein cache's
    data_ptr() key had cost four graph breaks in this forward) and give eager's scores, whether
    an eager call (the batch-size probe) filled the cache first or not. Traced with dynamo
    only (no inductor), on the CPU."""
    import torch
    import torch._dynamo

    net = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.inference_mode():
        want = net(x) if eager_first else None
        explained = torch._dynamo.explain(net)(x)
        got = torch.compile(net, backend="eager", fullgraph=True)(x)
        want = net(x) if want is None else want
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_benchmark_steps_run_within_their_budget(tmp_path):
    """A GPU session's benchmark steps: a step whose expected time does not fit what is left
    of the budget is skipped, not started (a compilation must not run past the device's
    limit); the others run, and the JSON is written after each."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_gpu import StepLog
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    report: dict = {}
    step = StepLog(report, tmp_path / "steps.json", budget=30, only="^(a|b|c)$")
    assert step("a", lambda: 1) == 1
    assert step("b", lambda: 2, needs=60) is None  # would end past the budget
    assert step("c", lambda: 3, needs=5) == 3
    assert step("d", lambda: 4) is None  # not selected
    saved = json.loads((tmp_path / "steps.json").read_text())
    assert saved["steps"] == {"a": 1, "c": 3} and "budget" in saved["errors"]["b"]
    assert report["not_selected"] == ["d"]


def test_head_compile_candidate_is_one_graph_with_eager_scores():
    """benchmarks/candidates.py's head_compile (the GPU session times it with inductor):
    dynamo sees the Mask2Former head as one graph, and the scores are eager's. Through
    dynamo and AOTAutograd on the CPU (no inductor)."""
    import torch
    import torch._dynamo

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from candidates import head_compile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from crossearth_cli.model.crossearth import FEATURE_SCALES

    net = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.inference_mode():
        want = net(x)
        maps, queries = net.backbone.forward_maps(x)
        explained = torch._dynamo.explain(net.decode_head)(maps, queries, FEATURE_SCALES)
        compiled = head_compile(net, backend="aot_eager")
        got = compiled(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, [
        b.reason for b in explained.break_reasons]
    assert compiled.decode_head is not net.decode_head and compiled.backbone is net.backbone
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


COMPILED_WITH_FUSED_MSDA = """
import json, torch, torch._dynamo
from crossearth_cli.model import CrossEarth
from crossearth_cli.model.ms_deform_attn import MSDeformAttn
from crossearth_cli.model.random_init import random_state_dict, tiny_config
forward, calls = MSDeformAttn.forward, []
def fused(self, *args, fused=None):  # the Triton kernel, as CUDA runs take it
    calls.append(torch.compiler.is_compiling())
    return forward(self, *args, fused=True)
MSDeformAttn.forward = fused
config = tiny_config(num_classes=4)
net = CrossEarth(config).eval()
net.load_state_dict(random_state_dict(config, seed=0))
x = torch.randn(1, 3, 32, 32)  # one small image: the interpreter runs each program in Python
graphs, aot_eager = [], torch._dynamo.lookup_backend("aot_eager")
def counted(gm, example_inputs):  # each graph dynamo hands over (a break makes two)
    graphs.append(gm)
    return aot_eager(gm, example_inputs)
with torch.inference_mode():
    want = net(x)
    got = torch.compile(net, backend=counted)(x)
breaks = torch._dynamo.utils.counters["graph_break"]
print(json.dumps({"breaks": [str(b)[:300] for b in breaks], "graphs": len(graphs),
                  "traced": any(calls), "max_abs_diff": float((got - want).abs().max()),
                  "scale": float(want.abs().max())}))
"""


def test_torch_compile_keeps_the_fused_deformable_attention_in_one_graph():
    """On CUDA `--compile` meets the Triton deformable attention too. Traced into, Triton's
    launcher broke the graph at every encoder layer (here, under the interpreter: 3 breaks,
    4 graphs); while compiling the kernel is now the custom op ``crossearth::msda``, opaque to
    dynamo, with a fake for shapes. Run by Triton's interpreter on the CPU, through dynamo and
    AOTAutograd (no inductor)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILED_WITH_FUSED_MSDA],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["traced"] and report["graphs"] == 1 and not report["breaks"], report
    # float32 rounding, relative to the scores' size (~5): 5.5e-6 idle, 1.7e-5 once in a busy
    # CI run (two xdist workers); a wrong kernel differs by whole units
    assert report["max_abs_diff"] < 1e-5 * max(1.0, report["scale"]), report


def test_fused_pixel_decoder_candidate_matches_eager_autocast():
    """benchmarks/fused_pixel.py (a GPU candidate gpu_session.sh times), run by Triton's
    interpreter: its add-and-norm kernel gives eager's casts exactly and the LayerNorm to its
    last bits; the encoder it replaces and the whole model (through the patch the benchmark
    uses) stay within bf16 rounding of eager; so does its variant with the softmax and the
    sampling points made in the deformable-attention kernel."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_pixel.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    kernel = report["add_norm"]
    assert kernel["cast_equal"] and kernel["pos_cast_equal"], kernel
    assert kernel["ln_max_abs_diff"] < 1e-5, kernel
    assert report["encoder"]["max_rel_diff"] < 2**-7, report["encoder"]  # a bf16 step
    assert report["model"]["fused_calls"] == 1, report["model"]
    assert report["model"]["class_agreement"] >= 0.98, report["model"]
    # the variant whose deformable-attention kernel makes the softmax and the sampling points
    # from the projection itself: float32 as the PyTorch path, bf16 as near float32 as eager
    assert report["msda_from_projection"]["max_abs_diff"] < 1e-5, report["msda_from_projection"]
    in_kernel = report["encoder_sampling_in_kernel"]
    assert (in_kernel["max_rel_diff_vs_float32"]
            <= 1.25 * in_kernel["eager_max_rel_diff_vs_float32"]), in_kernel
    assert report["model_sampling_in_kernel"]["fused_calls"] == 1, report
    assert report["model_sampling_in_kernel"]["class_agreement"] >= 0.98, report


# --- CUDA-only choices, checked with torch.cuda stood in for (no GPU here) ---------------------


def test_an_out_of_memory_batch_size_probe_is_the_batch_size_one_error(monkeypatch):
    """--batch-size auto on a GPU sizes the batch from one tile; that tile out of memory is
    "out of memory even with batch size 1" with its fix (a raw torch error before, which a
    folder run recorded as an internal error to report)."""
    import torch

    from crossearth_cli.engine import Predictor
    from crossearth_cli.errors import UserError

    class OutOfMemory(torch.nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    predictor = Predictor(per_pixel_spec(num_classes=4), torch.device("cpu"), "fp32", "auto",
                          OutOfMemory())
    predictor.cuda = True  # the probe is run on CUDA only
    predictor._to_device = lambda images, valid: (images, valid)
    for name, value in (("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                        ("reset_peak_memory_stats", lambda *a: None),
                        ("memory_allocated", lambda *a: 0),
                        ("max_memory_allocated", lambda *a: 1),
                        ("mem_get_info", lambda *a: (1, 1))):
        monkeypatch.setattr(torch.cuda, name, value)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(UserError, match="out of memory even with batch size 1") as err:
        predictor(images, torch.ones(4, 16, 16, dtype=torch.bool))
    assert "--device cpu" in err.value.one_line()


def test_automatic_precision_is_fp16_on_gpus_without_bf16_tensor_cores(monkeypatch):
    import torch

    from crossearth_cli.engine import resolve_precision

    gpu = torch.device("cuda", 0)
    for capability, expected in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                 ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert resolve_precision("auto", gpu) == expected, capability
        assert resolve_precision("bf16", gpu) == "bf16"  # asked for: as asked
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_a_session_on_a_second_gpu_makes_it_the_current_device(monkeypatch):
    """A torchrun rank on cuda:1 (or --device cuda:1) must make it the current device before
    anything runs: stream contexts restore the current device's stream and Triton launches on
    the current device, which stayed GPU 0."""
    import torch

    from crossearth_cli import engine

    class Chosen(Exception):
        pass

    chosen = []

    def set_device(device):
        chosen.append(torch.device(device))
        raise Chosen  # the rest needs a real GPU

    monkeypatch.setattr(engine, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(Chosen):
        engine.Session(per_pixel_spec(num_classes=2), device="cuda:1")
    assert chosen == [torch.device("cuda", 1)]


def test_torchrun_ranks_take_their_own_gpus(monkeypatch):
    import torch

    from crossearth_cli.batch import RankInfo
    from crossearth_cli.distributed import device_for
    from crossearth_cli.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    second = RankInfo(rank=1, world=2, local_rank=1)
    assert [device_for(second, d) for d in ("auto", "cuda", "cpu")] == ["cuda:1", "cuda:1", "cpu"]
    with pytest.raises(ConfigError, match="puts every rank on the same GPU"):
        device_for(second, "cuda:0")  # each rank would size its batch from one card
    assert device_for(RankInfo(rank=0, world=1, local_rank=0), "cuda:2") == "cuda:2"


def test_scenes_up_to_16384_px_wide_run_in_one_stripe_on_a_gpu(tmp_path, monkeypatch):
    """The row band is in GPU memory there: stripes of 16384 columns (8192 on the CPU, where
    it is in host memory), so a Sentinel-2 tile (10980 px) runs no tile twice."""
    import torch

    from crossearth_cli import engine
    from crossearth_cli.raster.windows import tile_grid

    assert engine.stripe_width(torch.device("cuda", 0)) == 16384
    assert engine.stripe_width(torch.device("cpu")) == 8192
    asked = []

    def narrow(device):
        asked.append(device.type)
        return 96

    monkeypatch.setattr(engine, "stripe_width", narrow)
    src = write_tif(tmp_path / "wide.tif", random_scene(64, 1100, seed=1))  # 512-px stripes
    r = engine.segment(engine.SegmentSettings(input=src, output=tmp_path / "o.tif"),
                       per_pixel_spec(num_classes=3))
    windows = sum(len(row) for row in tile_grid(64, 1100, 64, 40))
    assert asked == ["cpu"] and r.tiles > windows  # stripes: their edge tiles ran twice
