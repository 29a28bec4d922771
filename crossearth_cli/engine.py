"""The segmentation loop: reader threads → batches → model → row-band accumulator → writers.

Tiles are read ahead in background threads (rasterio releases the GIL), stacked into batches,
normalised on the model's device, run under ``torch.inference_mode`` (and autocast for bf16 /
fp16), and blended into a band of rows that lives on the same device. Finished rows come back
to the host as uint8 and are written straight away (on CUDA once the next batch is queued: their
copies run behind the model), so memory never depends on scene height.
"""

from __future__ import annotations

import gc
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rasterio.transform import Affine

from crossearth_cli.allocator import keep_freed_memory
from crossearth_cli.compiled import CompiledForward
from crossearth_cli.cpus import available_cpus
from crossearth_cli.cuda_graphs import GraphedForward, cuda_graphs_wanted
from crossearth_cli.errors import ConfigError, UserError, is_out_of_memory
from crossearth_cli.raster.accumulator import (
    CLASS_NODATA,
    CONFIDENCE_NODATA,
    PROBABILITY_NODATA_U8,
    PROBABILITY_SCALE_U8,
    FinishedRows,
    RowBandAccumulator,
    upload,
)
from crossearth_cli.raster.aoi import AreaOfInterest
from crossearth_cli.raster.reader import (
    NETWORK_IO_THREADS,
    BandScaling,
    Scaling,
    SceneReader,
    SharedScaling,
    StripFeed,
    cpu_io_threads,
)
from crossearth_cli.raster.windows import (
    BLEND_MODES,
    ColumnStripe,
    Tile,
    column_stripes,
    tile_grid,
)
from crossearth_cli.raster.writer import (
    GeoTiffSink,
    RasterSpec,
    check_output_path,
    class_tags,
    compression_threads,
    palette_colormap,
    remove_stale_parts,
    remove_stale_temps,
)
from crossearth_cli.tta import averaged_scores
from crossearth_cli.tta import check_mode as check_tta

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# Scenes wider than this are run in vertical stripes of at most this many output columns, so
# the row band's memory stops growing with the width (tiles at stripe edges run twice: ~3 %).
STRIPE_WIDTH = 8192
# On a GPU the band is in its memory (~0.2 GB at 16384 columns for 6 classes) and the host
# keeps only strips: stripes twice as wide, so scenes up to 16384 px (a Sentinel-2 tile's
# 10980) run no tile twice (a 16384² scene ran 2400 tiles for its 2304 windows)
GPU_STRIPE_WIDTH = 16384

Events = Callable[[str, dict], None]


@dataclass
class ModelSpec:
    """A loaded model and what the outputs need to know about it."""

    module: torch.nn.Module
    class_names: list[str]
    palette: list[tuple[int, int, int]] | None = None
    crop: int = 512
    stride: int = 341
    band_order: str = "RGB"
    label: str = "model"
    random_weights: bool = False
    preset: str | None = None  # the released model it is, when known
    gsd_m: float | None = None  # the pixel size of its training imagery (the preset's)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class SegmentSettings:
    input: Path
    output: Path
    tile: int | None = None
    stride: int | None = None
    blend: str = "gaussian"
    bands: list[int] | None = None
    value_range: str | list[BandScaling] | SharedScaling | None = None  # None: 8-bit as is
    batch_size: int | str = "auto"  # or a number; auto: 4 on the CPU, sized from GPU memory
    device: str = "auto"
    precision: str = "auto"
    confidence: Path | None = None
    probabilities: Path | None = None
    probabilities_dtype: str = "uint8"
    cog: bool = False
    overwrite: bool = False
    compress: str = "deflate"
    io_threads: int | None = None
    compile: bool = False  # torch.compile the model (measure first: see docs/performance.md)
    tta: str = "none"  # test-time augmentation: none | flip | d4 (crossearth_cli/tta.py)
    aoi: AreaOfInterest | None = None  # only this area (crossearth_cli/raster/aoi.py)

    def outputs(self) -> list[Path]:
        return [p for p in (self.output, self.confidence, self.probabilities) if p is not None]


@dataclass
class SegmentResult:
    output: Path
    height: int
    width: int
    tiles: int
    tiles_skipped: int
    seconds: float
    class_names: list[str]
    class_pixels: np.ndarray
    nodata_pixels: int
    batch_size: int
    device: str
    precision: str
    extra_outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tta: str = "none"  # the views each tile was seen in (model time × 1, 4 or 8)
    # with --aoi: the outputs' (col_off, row_off, width, height) in the input's pixels
    window: tuple[int, int, int, int] | None = None

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def mpx_per_s(self) -> float:
        return self.pixels / 1e6 / max(self.seconds, 1e-9)

    def class_shares(self) -> dict[str, float]:
        total = max(int(self.class_pixels.sum()), 1)
        return {n: float(c) / total for n, c in zip(self.class_names, self.class_pixels)}


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"--device {name!r} is not a device", hint="use auto, cpu or cuda:N"
        ) from None
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, meta...: torch knows them, we do not run there
        raise ConfigError(f"--device {name!r}: crossearth runs on the CPU or a CUDA GPU",
                          hint="use auto, cpu or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available",
                              hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return dev


def stripe_width(device: torch.device) -> int:
    """The most output columns a scene runs at once (wider ones run in stripes)."""
    return GPU_STRIPE_WIDTH if device.type == "cuda" else STRIPE_WIDTH


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    name = (name or "auto").lower()
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        # bf16 needs Ampere's tensor cores (compute capability 8): a V100 or T4 emulates it,
        # slowly, and has no fused attention for it; fp16 is what they run fast
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if name not in _PRECISIONS:
        raise ConfigError(f"--precision {name!r}: use fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU", hint="use bf16 or fp32 on the CPU")
    return name


class Predictor:
    """Runs batches through the model; halves the batch and retries on out-of-memory.

    Host batches are stacked into reused (pinned, on CUDA) buffers; on CUDA they are copied on
    a side stream so the copy of one batch overlaps the compute of the previous one.
    ``batch_size="auto"`` measures one tile's peak memory on the GPU and fills ~70% of what is
    free (4 on the CPU).
    """

    AUTO_CPU_BATCH = 4
    AUTO_MAX_BATCH = 64

    def __init__(self, spec: ModelSpec, device: torch.device, precision: str,
                 batch_size: int | str, module: torch.nn.Module | None = None,
                 probe_module: torch.nn.Module | None = None, tta: str = "none"):
        """``probe_module``: what ``auto`` sizes the batch with, if not ``module`` (the eager
        model behind a compiled one: a batch-1 probe would cost a compilation of its own).
        ``tta``: the views each tile is seen in (:mod:`crossearth_cli.tta`)."""
        self.module = module if module is not None else spec.module
        self.probe_module = probe_module if probe_module is not None else self.module
        self.device = device
        self.precision = precision
        self.auto = batch_size == "auto"
        self.batch_size = self.AUTO_CPU_BATCH if self.auto else max(1, int(batch_size))
        self.num_classes = spec.num_classes
        self.tta = tta
        self.mean = upload(IMAGENET_MEAN, device, torch.float32).view(1, 3, 1, 1)
        self.std = upload(IMAGENET_STD, device, torch.float32).view(1, 3, 1, 1)
        self.halvings = 0
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._host: dict[str, torch.Tensor] = {}
        self._work: torch.Tensor | None = None
        self._scaling = None

    # -- host staging ---------------------------------------------------------------------

    def _buffer(self, name: str, shape: tuple, dtype) -> torch.Tensor:
        if self.cuda:  # torch's caching host allocator reuses pinned blocks once copies finish
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        buf = self._host.get(name)
        if (buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:]
                or buf.shape[0] < shape[0]):
            buf = torch.empty(shape, dtype=dtype)
            self._host[name] = buf
        return buf[: shape[0]]

    # pixel types staged as they are (converted on the device, 1/4 of the float32 bytes for
    # 8-bit data); others (uint16, uint32, ...) are widened to float32 on the host
    _STAGE_AS_IS = {np.dtype(t): getattr(torch, t) for t in
                    ("uint8", "int8", "int16", "int32", "float32", "float64")}

    def stage(self, images: list[np.ndarray], valid: list[np.ndarray]):
        """Stack tiles (3×h×w in the file's dtype, h×w bool) into one host batch."""
        n = len(images)
        dtype = self._STAGE_AS_IS.get(images[0].dtype, torch.float32)
        x = self._buffer("images", (n, *images[0].shape), dtype)
        v = self._buffer("valid", (n, *valid[0].shape), torch.bool)
        xn = x.numpy()
        for i, img in enumerate(images):
            np.copyto(xn[i], img, casting="unsafe")
        np.stack(valid, out=v.numpy())
        return x, v

    # -- running ------------------------------------------------------------------------

    def device_masks(self, valid: torch.Tensor) -> torch.Tensor:
        """The staged masks on the model's device, copied behind earlier work: one copy serves
        the model (pass it as ``valid_device``) and the blending band."""
        return valid.to(self.device, non_blocking=self.cuda)

    def __call__(self, images: torch.Tensor, valid: torch.Tensor,
                 scaling: Scaling | None = None,
                 valid_device: torch.Tensor | None = None) -> torch.Tensor:
        """images: B×3×h×w raw values (host), valid: B×h×w → scores B×C×h×w on the device.

        ``valid`` must be the host's masks: whether a batch has nodata is asked of them, which
        on the GPU's copy would make the host wait for all queued work before every batch.
        ``valid_device``: the same masks already on the device (:meth:`device_masks`), so the
        model's masking needs no second copy. ``scaling`` maps raw values to the model's
        0–255 (None: already on that scale); its ``low`` and ``factor`` hold one row of band
        values for the batch or, for tiles of several scenes, one row per tile (B×bands).
        """
        scaling_all = self._scaling_on_device(scaling)
        if self.auto and self.cuda:
            self._scaling = _tile_rows(scaling_all, slice(0, 1))
            failed = False
            try:
                self._probe(images[:1], valid[:1])
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_out_of_memory(exc):
                    raise
                failed = True  # not the exception: its traceback would hold the tensors
            if failed:  # out of the handler, so the tile's tensors are released first
                self._release_memory()
                raise self._out_of_memory_at_one()
        out: torch.Tensor | None = None  # the whole batch's scores, filled part by part
        i = 0
        while i < images.shape[0]:
            n = min(self.batch_size, images.shape[0] - i)
            part = slice(i, i + n)
            self._scaling = _tile_rows(scaling_all, part)
            failed = False
            try:
                on_device = None if valid_device is None else valid_device[part]
                scores = self._forward(images[part], valid[part], on_device)
                if n == images.shape[0]:
                    return scores
                if out is None:  # not a cat of the parts at the end: twice the scores' memory
                    out = scores.new_empty((images.shape[0], *scores.shape[1:]))
                out[part] = scores
                del scores
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_out_of_memory(exc):
                    raise
                if n == 1:
                    raise self._out_of_memory_at_one(exc) from exc
                self.batch_size = max(1, n // 2)
                self.halvings += 1
                failed = True
            if failed:  # out of the handler: the failed batch's tensors are released now
                self._release_memory()
                continue  # retry the same tiles with the smaller batch: nothing is lost
            i += n
        return out

    def _release_memory(self) -> None:
        """After an out-of-memory: what the failed tensors held, those its traceback's
        reference cycles kept included, and on CUDA the cache's blocks."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _out_of_memory_at_one(self, cause: BaseException | None = None) -> UserError:
        hint = "use a smaller --tile" + (" or --device cpu" if self.cuda else "")
        if cause is not None and "could not create a primitive" in str(cause).lower():
            # oneDNN says no more than this, and not only when memory is short
            return UserError("out of memory even with batch size 1 (oneDNN: could not create a "
                             "primitive)", hint=hint + "; if memory is not short, run with "
                             "--debug and report it")
        return UserError("out of memory even with batch size 1", hint=hint)

    def _probe(self, image: torch.Tensor, valid: torch.Tensor) -> None:
        """Size the batch from one tile's peak memory (once)."""
        self.auto = False
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._forward(image, valid, module=self.probe_module)
        torch.cuda.synchronize(self.device)
        per_tile = max(torch.cuda.max_memory_allocated(self.device) - before, 1)
        free, _ = torch.cuda.mem_get_info(self.device)
        self.batch_size = int(max(1, min(self.AUTO_MAX_BATCH, 0.7 * free // per_tile)))

    def _scaling_on_device(self, scaling: Scaling | None):
        if scaling is None or (scaling.low is None and not scaling.clip):
            return None
        if scaling.low is None:
            return None, None, True
        # per batch: a plain copy to the GPU would make the host wait for its queued work
        low = upload(scaling.low, self.device)
        factor = upload(scaling.factor, self.device)
        bands = low.shape[-1]  # (bands,) for the batch or (B, bands): one row per tile
        return low.reshape(-1, bands, 1, 1), factor.reshape(-1, bands, 1, 1), scaling.clip

    def _to_device(self, images: torch.Tensor, valid: torch.Tensor):
        if not self.cuda:  # the staged batch stays intact for out-of-memory retries
            if self._work is None or self._work.shape != images.shape:
                self._work = torch.empty(images.shape, dtype=torch.float32)
            return images, valid
        with torch.cuda.stream(self.copy_stream):
            x = images.to(self.device, non_blocking=True)
            v = valid.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        x.record_stream(compute)
        v.record_stream(compute)
        return x, v

    def _normalise(self, x: torch.Tensor, v: torch.Tensor, nodata: bool = True) -> torch.Tensor:
        """Raw values → (clip(stretch) − mean) / std, as few passes over the batch as possible.

        The input may still be in the file's integer type; the result is float32 in a reused
        work buffer on the CPU (the staged batch stays intact for out-of-memory retries) or in
        place on the GPU when the copy is already float32. ``nodata``: some pixel is invalid.
        """
        if not self.cuda:
            out = self._work
        elif x.dtype == torch.float32:
            out = x
        else:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        inv_std = 1.0 / self.std
        if self._scaling is None:  # 8-bit data as is: x / std - mean / std in one pass
            torch.addcmul(-self.mean * inv_std, x, inv_std, out=out)
        else:
            low, factor, clip = self._scaling
            if low is not None:
                torch.sub(x, low, out=out).mul_(factor)
            elif out is not x:
                out.copy_(x)  # converts to float32
            if clip:
                out.clamp_(0.0, 255.0)
            out.sub_(self.mean).mul_(inv_std)
        if nodata:
            out.masked_fill_(~v.unsqueeze(1), 0.0)  # nodata (NaN too) becomes the mean colour
        return out

    def _forward(self, images: torch.Tensor, valid: torch.Tensor,
                 valid_device: torch.Tensor | None = None,
                 module: torch.nn.Module | None = None) -> torch.Tensor:
        # asked of the host copy: on the device's copy the question would make the CPU wait
        # for the GPU before every batch, and the launches of the next batch could not queue
        nodata = not bool(valid.all())
        x, v = self._to_device(images, valid if valid_device is None else valid_device)
        x = self._normalise(x, v, nodata)
        dtype = _PRECISIONS[self.precision]
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            scores = averaged_scores(module if module is not None else self.module, x,
                                     self.tta)
        if scores.shape[1] != self.num_classes:
            raise UserError(
                f"the model returns {scores.shape[1]} classes but {self.num_classes} class "
                "names were given",
                hint="check --model / --checkpoint",
            )
        return scores.float()


def _tile_rows(scaling, part: slice):
    """The device scaling of tiles ``part`` of a batch (per-tile rows follow the tiles)."""
    if scaling is None or scaling[0] is None or scaling[0].shape[0] == 1:
        return scaling
    low, factor, clip = scaling
    return low[part], factor[part], clip


def _raster_specs(settings: SegmentSettings, spec: ModelSpec, notes: dict,
                  threads: int = 1) -> list[RasterSpec]:
    names = spec.class_names
    tags = class_tags(names, {"model": spec.label, **notes})
    desc = "class: " + ", ".join(f"{i}={n}" for i, n in enumerate(names))
    specs = [
        RasterSpec(
            path=settings.output,
            count=1,
            dtype="uint8",
            nodata=CLASS_NODATA,
            colormap=palette_colormap(spec.palette),
            tags=tags,
            band_descriptions=[desc],
            compress=settings.compress,
            threads=threads,
            cog=settings.cog,
            overview_resampling="mode",
        )
    ]
    if settings.confidence is not None:
        specs.append(
            RasterSpec(
                path=settings.confidence,
                count=1,
                dtype="uint8",
                nodata=CONFIDENCE_NODATA,
                tags={**tags, "scale": "confidence = value / 255"},
                band_descriptions=["confidence (max class probability x 255)"],
                scales=[1 / 255],
                compress=settings.compress,
                threads=threads,
                cog=settings.cog,
                overview_resampling="average",
            )
        )
    if settings.probabilities is not None:
        u8 = settings.probabilities_dtype == "uint8"
        specs.append(
            RasterSpec(
                path=settings.probabilities,
                count=spec.num_classes,
                dtype="uint8" if u8 else "float32",
                # float16: half floats on disk via GTiff NBITS=16 (rasterio has no float16 dtype)
                nbits=16 if settings.probabilities_dtype == "float16" else None,
                nodata=PROBABILITY_NODATA_U8 if u8 else float("nan"),
                tags={**tags, "scale": "probability = value / 254" if u8 else "probability"},
                band_descriptions=[f"probability: {n}" for n in names],
                scales=[1 / PROBABILITY_SCALE_U8] * spec.num_classes if u8 else None,
                compress=settings.compress,
                threads=threads,
                cog=settings.cog,
                overview_resampling="average",
            )
        )
    return specs


def validate_settings(settings: SegmentSettings) -> None:
    if settings.blend not in BLEND_MODES:
        raise ConfigError(f"--blend {settings.blend!r}: use one of {', '.join(BLEND_MODES)}")
    if settings.tile is not None and settings.tile < 16:
        raise ConfigError(f"--tile {settings.tile} is too small (at least 16 pixels)")
    if settings.stride is not None and settings.stride < 1:
        raise ConfigError("--stride must be at least 1")
    if settings.tile and settings.stride and settings.stride > settings.tile:
        raise ConfigError(
            f"--stride {settings.stride} is larger than --tile {settings.tile}: pixels would "
            "be skipped"
        )
    if settings.batch_size != "auto" and (
        not isinstance(settings.batch_size, int) or settings.batch_size < 1
    ):
        raise ConfigError("--batch-size must be a number of tiles (at least 1) or auto")
    check_tta(settings.tta)
    if settings.probabilities_dtype not in ("uint8", "float16", "float32"):
        raise ConfigError("--probabilities-dtype must be uint8, float16 or float32")
    if settings.compress.lower() not in ("deflate", "zstd", "lzw", "none"):
        raise ConfigError("--compress must be deflate, zstd, lzw or none")
    outs = settings.outputs()
    for p in outs:
        if Path(p).suffix.lower() not in ("", ".tif", ".tiff"):
            raise ConfigError(
                f"{p}: the rasters written are GeoTIFFs, not {Path(p).suffix} files",
                hint="give the output a .tif name",
            )
    seen: set[str] = set()
    for p in outs:
        key = str(Path(p).resolve())
        if key in seen:
            raise ConfigError(f"two outputs share one path: {p}",
                              hint="give each output its own name")
        seen.add(key)


def check_outputs(settings: SegmentSettings, job: tuple[int, int] | None = None) -> None:
    """Refuse outputs that cannot be written, lock them, and remove what killed runs left for
    them (temporaries; row parts of a torchrun job, see ``remove_stale_parts`` for ``job``)."""
    for p in settings.outputs():
        check_output_path(Path(p), settings.overwrite, inputs=[settings.input])
        remove_stale_temps(Path(p))
        remove_stale_parts(Path(p), job)


def tile_and_stride(settings: SegmentSettings, spec: ModelSpec) -> tuple[int, int]:
    """The tile and stride to use; a --tile alone keeps the preset's overlap ratio."""
    tile = settings.tile or spec.crop
    if settings.stride:
        return tile, settings.stride
    if settings.tile:
        return tile, max(1, round(tile * spec.stride / spec.crop))
    return tile, spec.stride


@dataclass(frozen=True)
class RowPart:
    """Part ``index`` of ``count`` of a scene split by bands of tile rows (one per rank)."""

    index: int
    count: int


@dataclass
class PartRange:
    """Which tile rows a part runs and which scene rows it writes."""

    first_tile_row: int  # first tile row to run (includes overlap with the previous part)
    end_tile_row: int  # one past the last tile row to run
    y0: int  # first scene row written
    y1: int  # one past the last scene row written


def part_range(grid: list[list[Tile]], height: int, part: RowPart | None,
               span: tuple[int, int] | None = None) -> PartRange:
    """Rows of part ``part``: output rows end where the single-run band finalises them, so the
    pieces are bit-identical to one run (tile rows overlapping the top are run again).

    ``span=(y0, y1)``: only these scene rows are output (an AOI's); tile rows that reach none
    of the part's rows are not run. A part may then have no rows (``y1 <= y0``)."""
    n = len(grid)
    y0, y1 = 0, height
    if part is not None and part.count > 1:
        a = part.index * n // part.count
        b = (part.index + 1) * n // part.count
        y0 = grid[a][0].y if a > 0 else 0
        y1 = grid[b][0].y if b < n else height
    if span is not None:
        y0, y1 = max(y0, span[0]), min(y1, span[1])
    if y1 <= y0:
        return PartRange(0, 0, y0, y0)
    first = next(i for i, row in enumerate(grid) if row[0].y + row[0].h > y0)
    end = sum(row[0].y < y1 for row in grid)
    return PartRange(first, end, y0, y1)


@dataclass
class PreparedScene:
    """An opened scene, its grid, and tiles already being read."""

    settings: SegmentSettings
    reader: SceneReader
    grid: list[list[Tile]]
    tile: int
    stride: int
    rows: PartRange
    stripes: list[ColumnStripe]
    feed: StripFeed  # of the first stripe, already reading
    columns: tuple[int, int]  # the scene columns output (all of them, but with an AOI)

    @property
    def out_width(self) -> int:
        return self.columns[1] - self.columns[0]

    def stripe_grid(self, stripe: ColumnStripe) -> list[list[Tile]]:
        """This part's tile rows, restricted to the stripe's tile columns."""
        return [row[stripe.first_col : stripe.end_col]
                for row in self.grid[self.rows.first_tile_row : self.rows.end_tile_row]]

    @property
    def tile_count(self) -> int:
        return sum(len(row) for s in self.stripes for row in self.stripe_grid(s))

    def close(self) -> None:
        self.feed.cancel()
        self.reader.close()


# Measured on a 2-core CPU with the tiny model (docs/performance.md): 80 s of compiling, then
# 3x slower than eager. On an H200 it gave +20 %.
COMPILE_CPU_NOTE = ("--compile applies to CUDA only and is ignored here: on the CPU "
                    "torch.compile made the model slower (docs/performance.md)")


def _tell_resolution(reader: SceneReader, spec: ModelSpec) -> None:
    """A note (told once in folder runs) when the scene's pixels are far from the size the
    model was trained on."""
    from crossearth_cli.raster.resolution import pixel_size_m, resolution_note

    if spec.gsd_m is None:
        return
    wkt = reader.crs.to_wkt() if reader.crs else None
    note = resolution_note(pixel_size_m(wkt, reader.transform, reader.width, reader.height),
                           spec.gsd_m, spec.preset or spec.label)
    if note and note not in reader.notes:
        reader.notes.append(note)
        reader.key_notes.append(note)


def runtime_module(module: torch.nn.Module, device: torch.device, precision: str,
                   compile: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """What a session runs (and the eager module behind it, which ``--batch-size auto``
    probes with): on CUDA the weights autocast would cast at every call are cast once (same
    numbers, +3 % on an H100, +0.65 GB of GPU memory for ViT-L), then ``--compile`` or, when
    asked for, CUDA graphs. The float32 ``module`` stays as it is. Not on the CPU: no gain
    measured there (docs/performance.md, (c)), and the copy would cost host memory."""
    from crossearth_cli.model.precision import autocast_weights

    if device.type != "cuda":
        return module, module
    eager = autocast_weights(module, _PRECISIONS[precision])
    if compile:
        # Tiles have one size per scene and smaller batches are padded: one compilation per
        # tile shape (and per batch size the out-of-memory halving picks); eager if it fails.
        return CompiledForward(torch.compile(eager, dynamic=False), eager), eager
    if cuda_graphs_wanted():  # opt-in until measured: crossearth_cli/cuda_graphs.py
        return GraphedForward(eager), eager
    return eager, eager


class Session:
    """What stays loaded across scenes: the model on its device, the predictor, reader threads."""

    def __init__(self, spec: ModelSpec, device: str = "auto", precision: str = "auto",
                 batch_size: int | str = "auto", io_threads: int | None = None,
                 compile: bool = False, tta: str = "none", network: bool = False):
        """``network``: scenes are read from a server; the reader threads are
        :data:`NETWORK_IO_THREADS` (latency to hide, not cores to share) unless ``io_threads``
        says otherwise, and torch keeps the cores it has for local reads."""
        self.spec = spec
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            # the current device too: a stream context (the copies' side stream) restores the
            # current device's stream on exit, and Triton launches on the current device, so a
            # rank on cuda:1 would otherwise switch to GPU 0 and launch its kernels there
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(precision, self.device)
        check_tta(tta)
        configure_cpu_threads(self.device, io_threads)
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse the model's temporaries (crossearth_cli/allocator.py)
        spec.module = spec.module.to(self.device).eval()
        self.notes: list[str] = []  # told once, with the first scene's notes
        if compile and self.device.type != "cuda":
            self.notes.append(COMPILE_CPU_NOTE)
        module, eager = runtime_module(spec.module, self.device, self.precision, compile)
        self.predictor = Predictor(spec, self.device, self.precision, batch_size, module,
                                   probe_module=eager, tta=tta)
        self.io_threads = io_threads or (NETWORK_IO_THREADS if network else cpu_io_threads())
        self.compress_threads = compression_threads(self.device.type == "cpu")
        self.pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="crossearth-read")

    @classmethod
    def for_settings(cls, spec: ModelSpec, settings: SegmentSettings, network: bool = False,
                     device: str | None = None) -> Session:
        """A session for scenes run with ``settings`` (their device, precision, batch size,
        reader threads, compile and TTA); ``device`` overrides theirs (a torchrun rank's)."""
        return cls(spec, device or settings.device, settings.precision, settings.batch_size,
                   settings.io_threads, settings.compile, tta=settings.tta, network=network)

    def prepare(self, settings: SegmentSettings, part: RowPart | None = None,
                reader: SceneReader | None = None, prime: bool = True) -> PreparedScene:
        """Open a scene and start reading its first tiles (safe to call from another thread).

        ``prime=False``: open it only; its reads start when it runs or ``scene.feed.prime()``
        is called (a folder run reads ahead only the scenes small enough to share batches)."""
        validate_settings(settings)
        if settings.tta != self.predictor.tta:  # views are the session's: one model wrapper
            raise ConfigError(f"the scene asks for --tta {settings.tta} but the session runs "
                              f"--tta {self.predictor.tta}")
        tile, stride = tile_and_stride(settings, self.spec)
        if stride > tile:
            raise ConfigError(f"--stride {stride} is larger than the tile ({tile}, the "
                              "model's): pixels would be skipped",
                              hint="give a stride up to the tile, or a larger --tile")
        if reader is None:
            reader = SceneReader(settings.input, bands=settings.bands,
                                 value_range=settings.value_range,
                                 band_order=self.spec.band_order, aoi=settings.aoi)
        try:
            _tell_resolution(reader, self.spec)
            grid = tile_grid(reader.height, reader.width, tile, stride)
            # an AOI runs the whole scene's tiles that cover its window (its rows and columns
            # as a part and a stripe are run): inside it, exactly the whole run's numbers
            x0, y0, w, h = reader.aoi.window if reader.aoi else (0, 0, reader.width,
                                                                   reader.height)
            rows = part_range(grid, reader.height, part, span=(y0, y0 + h))
            stripes = column_stripes(grid[0], reader.width,
                                     max(stripe_width(self.device), 2 * tile), span=(x0, x0 + w))
            scene = PreparedScene(settings, reader, grid, tile, stride, rows, stripes, None,
                                  (x0, x0 + w))
            scene.feed = self.feed(scene, stripes[0])
            if prime:
                scene.feed.prime()
        except BaseException:
            reader.close()
            raise
        return scene

    def feed(self, scene: PreparedScene, stripe: ColumnStripe) -> StripFeed:
        return StripFeed(scene.reader, scene.stripe_grid(stripe), self.pool,
                         chunks=self.io_threads, columns=(stripe.x0, stripe.x1))

    def run(self, scene: PreparedScene, events: Events | None = None) -> SegmentResult:
        """Segment a prepared scene and commit its outputs."""
        try:
            check_outputs(scene.settings)
            return _run_scene(self, scene, events or (lambda kind, data: None))
        finally:
            scene.close()

    def group_key(self, scene: PreparedScene) -> tuple | None:
        """Scenes with equal keys can share forward passes (:meth:`run_group`): tiles of one
        shape and pixel type, all stretched or none (each tile keeps its own scene's range).
        None for a scene that runs alone: one read in vertical stripes, or one with tiles
        enough to fill a batch by itself."""
        if len(scene.stripes) != 1 or scene.tile_count >= self.predictor.batch_size:
            return None
        first, sc = scene.grid[0][0], scene.reader.model_scaling()
        return (first.h, first.w, scene.tile, scene.stride, np.dtype(scene.reader.dtype).str,
                sc.clip, sc.low is None)

    def run_group(self, scenes: list[PreparedScene],
                  events: Events | None = None) -> list[SegmentResult | Exception]:
        """Segment small scenes of one :meth:`group_key` through shared forward passes and
        commit each one's outputs; see :func:`_run_group`."""
        return _run_group(self, scenes, events or (lambda kind, data: None))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def segment(
    settings: SegmentSettings,
    spec: ModelSpec,
    events: Events | None = None,
    reader: SceneReader | None = None,
    part: RowPart | None = None,
) -> SegmentResult:
    """Segment one scene. Raises :class:`UserError` for anything the user can fix."""
    from crossearth_cli.raster.remote import is_remote

    with Session.for_settings(spec, settings, network=is_remote(settings.input)) as session:
        return session.run(session.prepare(settings, part, reader), events)


def _part_transform(scene: PreparedScene):
    """The outputs' transform: the scene's, moved to their first row and column."""
    x0, y0 = scene.columns[0], scene.rows.y0
    transform = scene.reader.transform
    return transform * Affine.translation(x0, y0) if x0 or y0 else transform


def _open_sinks(session: Session, scene: PreparedScene, sinks: list[GeoTiffSink]) -> None:
    """Open the scene's output rasters under temporary names, appending each to ``sinks`` (so
    the caller can abort those already open if one fails)."""
    settings, reader, rows = scene.settings, scene.reader, scene.rows
    # what a rerun needs to reproduce them: --bands, --range (the limits used, as --range
    # takes them), --precision, besides the tiling
    tag_notes = {"blend": settings.blend, "tile": str(scene.tile), "stride": str(scene.stride),
                 "bands": ",".join(map(str, reader.bands)), "precision": session.precision,
                 "range": "none" if reader.scaling is None else ",".join(
                     repr(float(v)) for s in reader.scaling for v in (s.low, s.high))}
    if session.predictor.tta != "none":
        tag_notes["tta"] = session.predictor.tta
    for rs in _raster_specs(settings, session.spec, tag_notes, session.compress_threads):
        sinks.append(GeoTiffSink(rs, rows.y1 - rows.y0, scene.out_width, reader.crs,
                                 _part_transform(scene), reader.gcps, reader.rpcs))


def _accumulator(session: Session, scene: PreparedScene, stripe: ColumnStripe,
                 sinks: list[GeoTiffSink]) -> RowBandAccumulator:
    """The row band of one column stripe (the sinks are told which columns come next)."""
    settings, reader, rows = scene.settings, scene.reader, scene.rows
    for sink in sinks:
        sink.start_columns(stripe.c0 - scene.columns[0], stripe.c1 - scene.columns[0])
    return RowBandAccumulator(
        reader.height,
        reader.width,
        session.spec.num_classes,
        scene.tile,
        scene.stride,
        settings.blend,
        device=session.device,
        confidence=settings.confidence is not None,
        probabilities=settings.probabilities_dtype if settings.probabilities else None,
        rows=(scene.grid[rows.first_tile_row][0].y, rows.y0, rows.y1),
        columns=(stripe.x0, stripe.x1, stripe.c0, stripe.c1),
    )


def _commit(sinks: list[GeoTiffSink], scene: PreparedScene, emit: Events) -> None:
    """Rename the outputs into place (all or none), then tell the notes that describe them."""
    GeoTiffSink.commit_together(sinks)
    for note in scene.reader.output_notes:
        emit("note", {"message": note, "outputs": True, "path": str(scene.settings.input)})


class _RowWriter:
    """Writes finished rows into a scene's rasters (classes, confidence, probabilities) and
    counts the pixels of each class. With an AOI, pixels outside its polygons become nodata
    first."""

    def __init__(self, sinks: list[GeoTiffSink], scene: PreparedScene, num_classes: int):
        self.sinks, self.y0 = sinks, scene.rows.y0
        self.counts = np.zeros(num_classes, dtype=np.int64)
        aoi = scene.reader.aoi
        self.inside = aoi.inside if aoi is not None and not aoi.rectangle else None
        self.x0 = scene.columns[0]  # scene column of the rows' first column (per stripe)

    def __call__(self, rows: FinishedRows) -> None:
        rows.wait()  # CUDA: the rows' copies to the host are done
        if self.inside is not None:
            self._mask_outside(rows)
        self.sinks[0].write_rows(rows.y - self.y0, rows.classes)
        k = 1
        if rows.confidence is not None:
            self.sinks[k].write_rows(rows.y - self.y0, rows.confidence)
            k += 1
        if rows.probabilities is not None:
            self.sinks[k].write_rows(rows.y - self.y0, rows.probabilities)
        self.counts += rows.class_counts

    def _mask_outside(self, rows: FinishedRows) -> None:
        h, w = rows.classes.shape
        out = rows.classes != CLASS_NODATA  # nodata rows stay untouched (they may be views)
        if not out.any():
            return
        out &= ~self.inside(self.x0, rows.y, w, h)
        if not out.any():
            return
        rows.class_counts = rows.class_counts - np.bincount(
            rows.classes[out], minlength=len(rows.class_counts))
        rows.classes[out] = CLASS_NODATA
        if rows.confidence is not None:
            rows.confidence[out] = CONFIDENCE_NODATA
        if rows.probabilities is not None:
            p = rows.probabilities
            p[:, out] = PROBABILITY_NODATA_U8 if p.dtype == np.uint8 else np.nan


def _scene_result(session: Session, scene: PreparedScene, sinks: list[GeoTiffSink],
                  counts: np.ndarray, skipped: int, seconds: float) -> SegmentResult:
    reader, rows = scene.reader, scene.rows
    out_h, out_w = rows.y1 - rows.y0, scene.out_width
    window = None
    if reader.aoi is not None:  # this part's rows of the AOI's window
        window = (scene.columns[0], rows.y0, out_w, out_h)
    return SegmentResult(
        output=scene.settings.output,
        height=out_h,
        width=out_w,
        tiles=scene.tile_count,
        tiles_skipped=skipped,
        seconds=seconds,
        class_names=list(session.spec.class_names),
        class_pixels=counts,
        nodata_pixels=out_h * out_w - int(counts.sum()),
        batch_size=session.predictor.batch_size,
        device=str(session.device),
        precision=session.precision,
        tta=session.predictor.tta,
        extra_outputs=[s.final for s in sinks[1:]],
        notes=reader.notes + reader.output_notes,
        window=window,
    )


def _announce(session: Session, scene: PreparedScene, emit: Events) -> None:
    """The notes of the session (once) and of the scene, then the scene's start."""
    for note in session.notes:
        emit("note", {"message": note})
    for note in scene.reader.notes:  # a folder run tells the key ones once, not every file's
        emit("note", {"message": note, "key": note in scene.reader.key_notes,
                      "path": str(scene.settings.input)})
    session.notes.clear()
    emit("start", {"tiles": scene.tile_count, "height": scene.rows.y1 - scene.rows.y0,
                   "width": scene.out_width})


def _run_scene(session: Session, scene: PreparedScene, emit: Events) -> SegmentResult:
    t0 = time.perf_counter()
    reader = scene.reader
    _announce(session, scene, emit)
    sinks: list[GeoTiffSink] = []
    try:
        _open_sinks(session, scene, sinks)
        write = _RowWriter(sinks, scene, session.spec.num_classes)
        skipped = 0
        for k, stripe in enumerate(scene.stripes):  # one stripe unless the scene is very wide
            feed = scene.feed if k == 0 else session.feed(scene, stripe).prime()
            acc = _accumulator(session, scene, stripe, sinks)
            write.x0 = stripe.c0
            try:
                skipped += _run_tiles(session.predictor, feed, acc, write,
                                      reader.model_scaling(), emit)
            finally:
                feed.cancel()
            del acc, feed  # free this stripe's band and strips before the next ones
        _commit(sinks, scene, emit)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return _scene_result(session, scene, sinks, write.counts, skipped,
                         time.perf_counter() - t0)


@dataclass
class _GroupMember:
    index: int
    scene: PreparedScene
    sinks: list[GeoTiffSink]
    acc: RowBandAccumulator | None = None
    write: _RowWriter | None = None
    tiles: list = field(default_factory=list)  # (tile, data or None for all-nodata, valid)


def _run_group(session: Session, scenes: list[PreparedScene],
               emit: Events) -> list[SegmentResult | Exception]:
    """Small scenes of one ``group_key``: their tiles are read, run through the model together
    (one forward pass per batch, not one per scene) and blended into each scene's own band;
    then each scene's outputs are committed as ``segment`` commits them.

    A folder of single-tile files otherwise runs every forward pass on one tile, however
    large the batch. Returns each scene's result or the exception it failed with (its
    outputs removed), in order; every scene is closed. A scene whose outputs, reads or
    writes fail does not stop the others; a failed forward pass fails the whole group.
    """
    t0 = time.perf_counter()
    predictor = session.predictor
    results: list[SegmentResult | Exception | None] = [None] * len(scenes)
    members = [_GroupMember(i, scene, []) for i, scene in enumerate(scenes)]

    def fail(m: _GroupMember, exc: Exception) -> None:
        for sink in m.sinks:
            sink.abort()
        results[m.index] = exc

    try:
        for m in members:
            try:
                _open_member(session, m, emit)
            except Exception as exc:  # noqa: BLE001 - this scene fails, the group goes on
                fail(m, exc)
        live = [m for m in members if results[m.index] is None]
        data = [(d, v, m.scene) for m in live for _, d, v in m.tiles if d is not None]
        scores = valid = None
        if data:
            images, host_valid = predictor.stage([d for d, _, _ in data],
                                                 [v for _, v, _ in data])
            valid = predictor.device_masks(host_valid)  # for the model and the bands
            try:
                scores = predictor(images, host_valid, _group_scaling([s for *_, s in data]),
                                   valid_device=valid)
            except Exception as exc:  # noqa: BLE001 - every scene of the group fails
                for m in live:
                    fail(m, exc)
                live = []
        n_tiles = max(sum(m.scene.tile_count for m in live), 1)
        k, skipped = 0, {}
        for m in live:  # every member's rows go to its writer threads first...
            first, k = k, k + sum(d is not None for _, d, _ in m.tiles)
            try:
                skipped[m.index] = _blend_member(m, scores, valid, first, emit)
            except Exception as exc:  # noqa: BLE001 - this scene fails, the group goes on
                fail(m, exc)
            finally:
                m.acc = m.tiles = None
        for m in live:  # ...then each is committed: their compression ran side by side
            if results[m.index] is not None:
                continue
            try:
                _commit(m.sinks, m.scene, emit)
                seconds = (time.perf_counter() - t0) * m.scene.tile_count / n_tiles
                results[m.index] = _scene_result(session, m.scene, m.sinks, m.write.counts,
                                                 skipped[m.index], seconds)
            except Exception as exc:  # noqa: BLE001 - this scene fails, the group goes on
                fail(m, exc)
    except BaseException:  # interrupted: nothing half-written stays
        for m in members:
            if results[m.index] is None:
                for sink in m.sinks:
                    sink.abort()
        raise
    finally:
        for m in members:
            m.scene.close()
    return results


def _open_member(session: Session, m: _GroupMember, emit: Events) -> None:
    """A group member's outputs opened, its band made and all its tiles read."""
    scene = m.scene
    check_outputs(scene.settings)
    _announce(session, scene, emit)
    _open_sinks(session, scene, m.sinks)
    m.acc = _accumulator(session, scene, scene.stripes[0], m.sinks)
    m.write = _RowWriter(m.sinks, scene, session.spec.num_classes)
    m.tiles = [(t, d, v) if v.any() else (t, None, None) for t, d, v in scene.feed]


def _blend_member(m: _GroupMember, scores: torch.Tensor | None, valid: torch.Tensor | None,
                  first: int, emit: Events) -> int:
    """Blend a member's tiles (its scores start at row ``first`` of the group's) and hand its
    rows to its outputs' writers (not committed yet); returns its all-nodata tiles."""
    skipped = 0
    for t, d, _ in m.tiles:
        if d is None:
            rows = m.acc.add(t, None, None)
            skipped += 1
        else:
            rows = m.acc.add(t, scores[first], valid[first])
            first += 1
        for r in rows:
            m.write(r)
    for r in m.acc.finish():
        m.write(r)
    emit("advance", {"tiles": len(m.tiles)})
    return skipped


def _group_scaling(scenes: list[PreparedScene]) -> Scaling:
    """One scaling for tiles of several scenes (``scenes[i]``: tile i's): per-tile rows of
    each scene's own stretch, or the shared no-stretch (group keys agree on which)."""
    scalings = [s.reader.model_scaling() for s in scenes]
    first = scalings[0]
    if first.low is None:
        return first
    return Scaling(np.stack([sc.low for sc in scalings]),
                   np.stack([sc.factor for sc in scalings]), first.clip)


def _run_tiles(predictor, feed, acc, write, scaling, emit) -> int:
    """One stripe's tiles through the model, in batches; returns the all-nodata tiles
    skipped."""
    skipped = 0

    # Finished rows not written yet, oldest first, with the number of the batch that emitted
    # them. On CUDA their copies to the host run behind that batch's forward: they are waited
    # for and written once the next batch is queued, so the GPU has that batch to run while the
    # host writes. Rows that need no wait (all rows on the CPU) go out at once. At most the
    # rows of two batches are held.
    pending: deque[tuple[int, FinishedRows]] = deque()

    def write_pending(before: int) -> None:
        """Write, in order, the rows of batches before ``before`` and any ready rows after."""
        while pending and (pending[0][0] < before or pending[0][1].ready is None):
            write(pending.popleft()[1])

    queue: list[tuple[Tile, np.ndarray | None, np.ndarray | None]] = []
    batch = 0

    def run_queue() -> None:
        nonlocal batch
        batch += 1
        data = [(d, v) for _, d, v in queue if d is not None]
        scores = None
        if data:
            images, host_valid = predictor.stage([d for d, _ in data], [v for _, v in data])
            valid = predictor.device_masks(host_valid)  # for the model and the band
            scores = predictor(images, host_valid, scaling, valid_device=valid)
        k = 0
        for t, d, _ in queue:
            if d is None:
                rows = acc.add(t, None, None)
            else:
                rows = acc.add(t, scores[k], valid[k])
                k += 1
            pending.extend((batch, r) for r in rows)
            write_pending(before=0)  # only rows that are ready
        write_pending(before=batch)  # the previous batch's rows: this one is queued now
        emit("advance", {"tiles": len(queue)})
        queue.clear()

    try:
        n_data = 0
        for t, data, valid in feed:
            if valid.any():
                queue.append((t, data, valid))
                n_data += 1
            else:
                queue.append((t, None, None))
                skipped += 1
            if n_data >= predictor.batch_size:
                run_queue()
                n_data = 0
        if queue:
            run_queue()
        pending.extend((batch + 1, r) for r in acc.finish())
        write_pending(before=batch + 2)
    except BaseException:
        # the run is abandoned and its sinks aborted: unwritten rows are dropped (a pinned
        # block whose copy is still queued is reused only after that copy)
        pending.clear()
        raise
    return skipped


def configure_cpu_threads(device: torch.device, io_threads: int | None) -> None:
    """On the CPU, leave a core to the reader/writer threads when there are cores to spare,
    and use no more threads than the CPUs this process may use (:mod:`crossearth_cli.cpus`).

    torch's intra-op pool defaults to every core; GDAL decompression and compression run in
    our threads beside it. With 2 cores both stay with torch (I/O mostly waits on the disk).
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = available_cpus()  # taskset and a container's CPU limit count, not the machine
    if cores > 4:
        torch.set_num_threads(max(1, cores - (io_threads or cpu_io_threads()) // 2))
    elif torch.get_num_threads() > cores:  # torch sees the machine's cores, not the quota
        torch.set_num_threads(cores)


def default_output_path(input_path: Path) -> Path:
    """``INPUT_classes.tif`` beside the input (one scene's class raster)."""
    return input_path.with_name(f"{input_path.stem}_classes.tif")

