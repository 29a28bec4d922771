"""One entry point: a class raster in, a GeoPackage out, window by window."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossearth_cli.errors import InputError, OutputError
from crossearth_cli.raster.remote import is_remote
from crossearth_cli.raster.writer import same_path
from crossearth_cli.vector.areas import MetricFrame
from crossearth_cli.vector.centerlines import LineJoiner
from crossearth_cli.vector.holes import halo_for
from crossearth_cli.vector.options import VectorizeOptions, VectorizeSummary
from crossearth_cli.vector.polygonize import SeamMerger
from crossearth_cli.vector.source import (
    ClassRaster,
    check_confidence,
    open_class_raster,
    pick_by_name,
    resolve_classes,
)
from crossearth_cli.vector.tasks import (
    Job,
    LineBatch,
    PolygonBatch,
    WindowResult,
    finalize_lines,
    finalize_polygons,
    init_worker,
    process_window,
    run_in_worker,
)
from crossearth_cli.vector.writer import GpkgWriter, check_output

Progress = Callable[[int, int], None]

POLYGON_FIELDS_BASE = [
    ("class_id", "int32"),
    ("class_name", "object"),
    ("area_m2", "float64"),
    ("perimeter_m", "float64"),
]
LINE_FIELDS = [("class_id", "int32"), ("class_name", "object"), ("length_m", "float64")]


def window_grid(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
    """Row-major (row_off, col_off, height, width) windows covering the raster."""
    out = []
    for r in range(0, height, size):
        for c in range(0, width, size):
            out.append((r, c, min(size, height - r), min(size, width - c)))
    return out


def layer_name(name: str) -> str:
    """A class name as a GeoPackage layer name: lower case, words joined by ``_``, accents
    dropped ("Épicerie fine" → ``epicerie_fine``); letters with no ASCII form kept."""
    import unicodedata

    plain = "".join(c for c in unicodedata.normalize("NFKD", name.strip())
                    if not unicodedata.combining(c))
    s = re.sub(r"\W+", "_", plain).strip("_").lower()
    if not s or s[0].isdigit():
        s = f"class_{s}" if s else "class"
    return s


def _resolve_feature_classes(src: ClassRaster, spec, selected) -> frozenset | None:
    """``True`` → by name (building/road) among the selected; a list → those classes."""
    if spec is False or spec is None:
        return frozenset()
    if spec is True:
        return None  # decided in _auto_by_name once the selection is known
    ids = resolve_classes(src, list(spec))
    return frozenset(ids or [])


def _auto_by_name(src: ClassRaster, selected, word: str) -> frozenset | None:
    pool = list(selected) if selected is not None else sorted(
        i for i in src.names if i != src.nodata
    )
    if not pool:
        return None  # a foreign raster with every class selected: every class
    return frozenset(pick_by_name(src, pool, word))


MAX_LAYERS = 256  # one GeoPackage layer per class: each costs ~0.1 s and a table in GIS


def _check_layer_count(src: ClassRaster) -> None:
    """A wider-than-8-bit raster may hold thousands of ids (an instance or label raster, not
    classes): one layer each would take minutes and swamp a GIS. Count them first (a read of
    the raster, stopping as soon as there are too many)."""
    import rasterio
    from rasterio.windows import Window

    seen: set[int] = set()
    rows = max(1, (1 << 22) // max(src.width, 1))
    with rasterio.open(src.path) as ds:
        for r0 in range(0, src.height, rows):
            arr = ds.read(1, window=Window(0, r0, src.width, min(rows, src.height - r0)))
            seen.update(int(v) for v in np.unique(arr))
            seen.discard(src.nodata)
            if len(seen) > MAX_LAYERS:
                raise InputError(
                    f"holds more than {MAX_LAYERS} distinct class ids, one layer each",
                    path=src.label,
                    hint="pass --single-layer (one layer with a class_id field) or --classes",
                )


def build_job(
    src: ClassRaster, options: VectorizeOptions, confidence: str | None
) -> tuple[Job, list[str]]:
    warnings: list[str] = []
    frame = MetricFrame.build(src.crs_wkt, src.transform, src.width, src.height)
    if src.sensor_model:
        warnings.append(
            f"{src.label} is georeferenced by {src.sensor_model} only: the vectors are in pixel "
            "coordinates (column, row; rows grow downwards) without a CRS, areas and lengths "
            "in pixels; orthorectify the raster first (e.g. gdalwarp) for map coordinates"
        )
    elif frame.mode == "unknown" and src.transform.is_identity:
        warnings.append(
            f"{src.label} has no georeferencing: the vectors are in pixel coordinates (column, "
            "row; rows grow downwards) without a CRS, and areas and lengths in pixels "
            "(area_m2 holds pixel counts)"
        )
    elif frame.mode == "unknown":
        warnings.append(
            f"{src.label} has no usable CRS: areas and lengths are in its own units, taken as "
            "metres"
        )
    selected = resolve_classes(src, options.classes)
    if selected is None and options.layer_per_class and np.dtype(src.dtype).itemsize > 1:
        _check_layer_count(src)
    reg = _resolve_feature_classes(src, options.regularize, selected)
    if options.regularize is True:
        reg = _auto_by_name(src, selected, "building")
    cl = _resolve_feature_classes(src, options.centerlines, selected)
    if options.centerlines is True:
        cl = _auto_by_name(src, selected, "road")
    px_area = frame.pixel_size_m[0] * frame.pixel_size_m[1]
    px_len = math.sqrt(px_area)
    fill_px = int(math.ceil(options.fill_holes / px_area)) if options.fill_holes > 0 else 0
    if fill_px > halo_for(fill_px):
        warnings.append(
            f"--fill-holes {options.fill_holes:g} m² is {fill_px:,.4g} pixels: holes wider or "
            f"taller than {halo_for(fill_px)} pixels that cross a window seam are left open "
            "(a bigger --window reaches further)"
        )
    size = int(options.window_size)
    windows = window_grid(src.height, src.width, size)
    job = Job(
        src=src,
        frame=frame,
        windows=windows,
        row_seams=list(range(size, src.height, size)),
        col_seams=list(range(size, src.width, size)),
        selected=tuple(selected) if selected is not None else None,
        connectivity=options.connectivity,
        simplify_px=options.simplify / px_len if options.simplify > 0 else 0.0,
        fill_px=fill_px,
        fill_halo=halo_for(fill_px) if fill_px > 1 else 0,
        min_area_m2=float(options.min_area),
        regularize_ids=reg,
        centerline_ids=cl,
        centerline_halo=int(options.centerline_halo),
        confidence=confidence,
    )
    return job, warnings


class _Layers:
    """Which layer each feature goes to, declared lazily with its schema."""

    def __init__(self, writer: GpkgWriter, src: ClassRaster, options, job: Job, conf: bool):
        self.w, self.src, self.opt, self.job = writer, src, options, job
        self.poly_fields = list(POLYGON_FIELDS_BASE)
        if conf:
            self.poly_fields.append(("mean_confidence", "float64"))
        self.geom_type = "Polygon" if options.connectivity == 4 else "MultiPolygon"
        self.names: dict[str, str] = {}  # layer → class that owns it (collision check)

    def _unique(self, base: str, owner: str) -> str:
        name = base
        k = 2
        while name in self.names and self.names[name] != owner:
            name = f"{base}_{k}"
            k += 1
        self.names[name] = owner
        return name

    def polygon_layer(self, class_id: int) -> str:
        if not self.opt.layer_per_class:
            name = self._unique(layer_name(self.opt.layer_name) or "polygons", "*poly")
        else:
            cname = self.src.name_of(class_id)
            name = self._unique(layer_name(cname), f"poly:{class_id}")
        self.w.declare(name, self.geom_type, self.poly_fields)
        return name

    def line_layer(self, class_id: int) -> str:
        if not self.opt.layer_per_class:
            name = self._unique("centerlines", "*line")
        else:
            cname = self.src.name_of(class_id)
            name = self._unique(f"{layer_name(cname)}_centerlines", f"line:{class_id}")
        self.w.declare(name, "LineString", LINE_FIELDS)
        return name

    def declare_known(self, selected, cl_ids) -> None:
        """Empty classes still get their (empty) layer, so a layer's absence means nothing."""
        ids = list(selected) if selected is not None else sorted(
            i for i in self.src.names if i != self.src.nodata
        )
        if not ids:
            return  # a foreign raster: layers appear with the classes found
        for i in ids if self.opt.layer_per_class else ids[:1]:
            self.polygon_layer(i)
        for i in sorted(ids if cl_ids is None else cl_ids):
            if i in ids:
                self.line_layer(i)
                if not self.opt.layer_per_class:
                    break

    def ensure_one(self) -> None:
        if not self.w.layers:  # nothing known, nothing found: still a valid, empty layer
            name = layer_name(self.opt.layer_name) or "polygons"
            self.names[name] = "*poly"
            self.w.declare(name, self.geom_type, self.poly_fields)

    def _write_by_class(self, batch, layer_of, fields: dict[str, np.ndarray]) -> None:
        """Write ``batch`` one class at a time into ``layer_of(class_id)`` with ``fields``."""
        if len(batch) == 0:
            return
        for c in np.unique(batch.class_id):
            sel = batch.class_id == c
            cols = {
                "class_id": batch.class_id[sel].astype(np.int32),
                "class_name": np.full(int(sel.sum()), self.src.name_of(int(c)), dtype=object),
                **{name: values[sel] for name, values in fields.items()},
            }
            self.w.write(layer_of(int(c)), batch.wkb[sel], cols)

    def write_polygons(self, batch: PolygonBatch) -> None:
        self._write_by_class(batch, self.polygon_layer, {
            "area_m2": batch.area_m2, "perimeter_m": batch.perimeter_m,
            "mean_confidence": batch.mean_confidence,
        })

    def write_lines(self, batch: LineBatch) -> None:
        self._write_by_class(batch, self.line_layer, {"length_m": batch.length_m})


def _results(job: Job, workers: int):
    """Window results in row-major order, computed by a bounded pool of processes."""
    n = len(job.windows)
    if workers <= 1:
        for i in range(n):
            yield process_window(job, i)
        return
    import multiprocessing as mp
    import sys
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    # fork on Linux: workers start at once and never re-import the caller's __main__ (a script
    # without a main guard, or `python -m crossearth_cli`, would otherwise run again in every
    # worker). Workers touch only GDAL, GEOS and NumPy, never the caller's threads or GPU.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    ex = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=init_worker, initargs=(job,)
    )
    try:
        ahead = 2 * workers  # bounded read-ahead: memory stays flat however many windows
        futures = {}
        nxt = 0
        for i in range(n):
            while nxt < n and nxt < i + ahead:
                with warnings.catch_warnings():  # Python ≥3.12 warns on fork with threads
                    warnings.simplefilter("ignore", DeprecationWarning)
                    futures[nxt] = ex.submit(run_in_worker, nxt)
                nxt += 1
            yield futures.pop(i).result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _auto_workers(requested: int, n_windows: int) -> int:
    if requested > 0:
        return min(requested, n_windows)
    if n_windows < 4:
        return 1
    from crossearth_cli.cpus import available_cpus

    return max(1, min(4, available_cpus(), n_windows))


def vectorize_raster(
    class_path: str | os.PathLike,
    out_path: str | os.PathLike,
    options: VectorizeOptions | None = None,
    confidence_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> VectorizeSummary:
    """Polygonize (and optionally regularize / skeletonize) a class raster into a GeoPackage.

    Raises :class:`~crossearth_cli.errors.UserError` subclasses for anything the user can fix
    (unreadable or float raster, unknown class, existing output, unwritable folder). The output
    appears atomically: on any error or interrupt nothing is left at ``out_path``.
    """
    t0 = time.perf_counter()
    options = options or VectorizeOptions()
    check_output(out_path, options.overwrite)
    for inp in (class_path, confidence_path):
        if inp is not None and not is_remote(inp) and same_path(Path(out_path), Path(inp)):
            raise OutputError(
                "the vector output is an input raster", path=out_path,
                hint="choose another -o path",
            )
    src = open_class_raster(class_path)
    conf = check_confidence(confidence_path, src) if confidence_path else None
    job, warnings = build_job(src, options, conf)
    workers = _auto_workers(options.workers, len(job.windows))
    summary = VectorizeSummary(
        out_path=str(Path(out_path)),
        windows=len(job.windows),
        workers=workers,
        crs=src.crs_wkt,
        area_mode=job.frame.mode,
        warnings=warnings,
    )
    merger = SeamMerger(job.connectivity, simplified=job.simplify_px > 0)
    joiner = LineJoiner(job.row_seams, job.col_seams)
    per_row = math.ceil(src.width / options.window_size)
    total = len(job.windows)
    with GpkgWriter(out_path, src.crs_wkt, overwrite=options.overwrite) as writer:
        layers = _Layers(writer, src, options, job, conf is not None)
        layers.declare_known(job.selected, job.centerline_ids)
        row: list[WindowResult] = []
        done = 0
        for res in _read_guard(_results(job, workers), src.label):
            summary.classes.update({c: src.name_of(c) for c in res.classes_seen})
            layers.write_polygons(res.polygons)
            layers.write_lines(res.lines)
            row.append(res)
            done += 1
            if progress is not None:
                progress(done, total)
            if len(row) == per_row:
                r0, _, h, _ = job.windows[res.index]
                bottom = r0 + h
                merged = merger.add_row([r.pieces for r in row])
                layers.write_polygons(_finish(job, merged))
                lc, lg = joiner.add_row(
                    [r.line_pieces for r in row], bottom if bottom < src.height else None
                )
                layers.write_lines(finalize_lines(job, lc, lg))
                row = []
        layers.write_polygons(_finish(job, merger.close()))
        lc, lg = joiner.close()
        layers.write_lines(finalize_lines(job, lc, lg))
        layers.ensure_one()
    counts = {name: layer.count for name, layer in writer.layers.items()}
    summary.layers = counts
    line_layers = {n for n, layer in writer.layers.items() if layer.geometry_type == "LineString"}
    summary.lines = sum(c for n, c in counts.items() if n in line_layers)
    summary.polygons = sum(c for n, c in counts.items() if n not in line_layers)
    summary.seconds = time.perf_counter() - t0
    return summary


def _read_guard(results, path):
    """A tile that fails to decode mid-run is the input's fault: one line, not a traceback."""
    from crossearth_cli.raster.reader import corrupt_is_input_error

    with corrupt_is_input_error(path, "cannot be read"):
        yield from results


def _finish(job: Job, merged) -> PolygonBatch:
    return finalize_polygons(
        job, merged.class_id, merged.exact, merged.out, merged.conf_sum, merged.conf_n
    )
