"""``crossearth segment``: the main job. Parses options, builds settings, calls the library
(``engine``, ``batch``), and decides what a folder run's rerun must redo.

One file in, one class raster out (``-o OUT.tif``). Several files, folders or globs in: one set of
outputs per input under ``-o OUTDIR``, resumable through a manifest. Under ``torchrun``, ranks
share the files, or split a single scene into row bands that are merged at the end.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import typer

from crossearth_cli.cli.app import app
from crossearth_cli.cli.console import (
    LogProgress,
    duration,
    note,
    one_log,
    out_console,
    progress_events,
)

AUTO = "auto"


@app.command("segment")
def segment_command(
    inputs: list[str] = typer.Argument(
        ..., help="GeoTIFF(s), folders (searched recursively), quoted globs ('tiles/**/*.tif') "
        "or URLs (https://, s3://, gs://, az://; one ending in / is a folder)."
    ),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Class raster for one input (default: "
        "INPUT_classes.tif), or the output folder for several (default: ./crossearth_out)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Preset name (see `crossearth models`); weights are fetched "
        "and cached from Hugging Face (default: potsdam-rgb)."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Local checkpoint (.pth or .safetensors)."
    ),
    backbone: Path | None = typer.Option(
        None, "--backbone", help="dinov2_converted*.pth for checkpoints without the backbone."
    ),
    bands: str | None = typer.Option(
        None, "--bands", "-b", help="3 band numbers (1-based) in the model's order, e.g. 4,1,2 "
        "for IRRG from RGBN (default: from the preset's band order and the file's colour "
        "bands)."
    ),
    value_range: str | None = typer.Option(
        None, "--range", help="Scaling to 0-255: auto (each scene's 2-98% percentiles), "
        "shared (one stretch from all inputs' values together, for tiles of one mosaic), none, "
        "MIN,MAX for all bands, or MIN,MAX,... per band (default: none for 8-bit, auto "
        "otherwise)."
    ),
    aoi: str | None = typer.Option(
        None, "--aoi", help="Segment only this area: a box W,S,E,N (in the raster's CRS, or "
        "--aoi-crs) or a vector file or URL (its polygons, every layer). The outputs cover "
        "the area's bounding box on the input's own pixel grid; pixels outside its polygons "
        "are nodata. "
        "Inputs it does not reach are left out of a folder run."
    ),
    aoi_crs: str | None = typer.Option(
        None, "--aoi-crs", help="CRS of the --aoi box (or of a file that has none), e.g. "
        "EPSG:4326 (default: each raster's own)."
    ),
    mosaic: bool = typer.Option(
        False, "--mosaic", help="The inputs are the tiles of one mosaic: segment them as one "
        "scene, so the model sees across file edges (no seams there), into one set of outputs "
        "(-o MOSAIC.tif). They must share the CRS, pixel size and grid, bands, pixel type and "
        "nodata."
    ),
    tile: int | None = typer.Option(
        None, "--tile", help="Tile size in pixels (default: the preset's crop)."
    ),
    stride: int | None = typer.Option(
        None, "--stride", help="Tile stride (default: the preset's, scaled with --tile)."
    ),
    overlap: float | None = typer.Option(
        None, "--overlap", help="Overlap instead of --stride: a fraction (0.33) or pixels (171)."
    ),
    blend: str = typer.Option(
        "gaussian", "--blend", help="gaussian | cosine: smooth, seamless; mean: exactly mmseg's "
        "slide_inference (the paper's numbers)."
    ),
    tta: str = typer.Option(
        "none", "--tta", help="Test-time augmentation: none | flip (each tile also mirrored "
        "left-right, up-down and both: 4 passes) | d4 (every mirror and quarter turn: 8 "
        "passes); the scores of the views are averaged. Slower by that factor; none gives "
        "the paper's numbers."
    ),
    batch_size: str = typer.Option(
        "auto", "--batch-size", help="Tiles per forward pass, or auto: 4 on the CPU, sized from "
        "free GPU memory on a GPU (halved and retried on out-of-memory either way)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option(
        "auto", "--precision",
        help="auto (bf16 on GPU, fp16 on GPUs before Ampere, fp32 on CPU) | fp32 | bf16 | fp16."
    ),
    confidence: str | None = typer.Option(
        None, "--confidence", help="Also write a confidence raster (uint8, max probability x "
        "255): a path, or 'auto': beside the class raster, named after it (classes.tif -> "
        "classes_confidence.tif, scene_classes.tif -> scene_confidence.tif); the only choice "
        "for several inputs."
    ),
    probabilities: str | None = typer.Option(
        None, "--probabilities", help="Also write per-class probabilities, one band per class: "
        "a path or 'auto' (named like --confidence auto, with _probabilities)."
    ),
    probabilities_dtype: str | None = typer.Option(
        None, "--probabilities-dtype",
        help="uint8 (p x 254, nodata 255; the default) | float16 | float32."
    ),
    vector: str | None = typer.Option(
        None, "--vector", help="Also vectorize to a GeoPackage with the preset's defaults "
        "(buildings regularized, roads as centerlines + polygons): a path or 'auto'."
    ),
    vector_min_area: float = typer.Option(
        0.0, "--vector-min-area", help="With --vector: drop polygons under this many m² "
        "(specks), as crossearth vectorize --min-area does."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the model on CUDA (pays a compile on start; "
        "see docs/performance.md for when it helps). Ignored on the CPU, where it is slower."
    ),
    cog: bool = typer.Option(False, "--cog", help="Write Cloud-Optimized GeoTIFFs with overviews."),
    compress: str = typer.Option("deflate", "--compress", help="deflate | zstd | lzw | none."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace existing outputs; with several inputs, redo every "
        "file even if the manifest says it is current."
    ),
    summary: Path | None = typer.Option(
        None, "--summary", help="Write a machine-readable JSON summary of the run here."
    ),
    vrt: Path | None = typer.Option(
        None, "--vrt", help="With several inputs: also write a VRT mosaic over all class rasters."
    ),
    allow_random_weights: bool = typer.Option(
        False, "--allow-random-weights", help="If the preset's weights are unavailable (offline), "
        "run a small random-weight model instead. Demos only: its classes mean nothing."
    ),
) -> None:
    """Segment GeoTIFFs into class rasters (plus confidence, probabilities, vectors)."""
    from crossearth_cli.batch import RankInfo, _is_glob
    from crossearth_cli.errors import ConfigError
    from crossearth_cli.raster.remote import is_folder, is_remote, use_network_defaults

    if stride is not None and overlap is not None:
        raise ConfigError("give --stride or --overlap, not both")
    if overlap is not None and not (0 <= overlap < 1 or (
            math.isfinite(overlap) and overlap == int(overlap))):  # NaN too
        raise ConfigError(f"--overlap {overlap:g}: give a fraction of the tile below 1 (0.33) "
                          "or whole pixels (171)")
    if not vector_min_area >= 0:  # NaN too
        raise ConfigError(f"--vector-min-area must be ≥ 0 m², not {vector_min_area}")
    if vector_min_area > 0 and vector is None:
        raise ConfigError("--vector-min-area applies to the GeoPackage: add --vector auto")
    if probabilities_dtype is not None and probabilities is None:
        raise ConfigError("--probabilities-dtype applies to the probabilities raster: add "
                          "--probabilities auto")
    probabilities_dtype = probabilities_dtype or "uint8"
    if aoi_crs is not None and aoi is None:
        raise ConfigError("--aoi-crs is the CRS of --aoi: add --aoi")
    remote = [text for text in inputs if is_remote(text)]
    if remote or (aoi is not None and is_remote(aoi)):
        use_network_defaults()
    area = None
    if aoi is not None:
        from crossearth_cli.raster.aoi import parse_aoi

        area = parse_aoi(aoi, aoi_crs)
        if RankInfo.from_env().rank == 0:
            for text in area.notes:
                note(text)
    if len(inputs) == 1 and not remote and _is_glob(inputs[0]):
        from crossearth_cli.batch import expand_inputs

        matches = expand_inputs(inputs)  # one that matches nothing fails here, by its pattern
        if len(matches) == 1 and output is not None and output.suffix.lower() in (".tif", ".tiff"):
            inputs = [str(matches[0].path)]  # one match and -o a .tif: run it as that file
    single = (len(inputs) == 1 and not _is_glob(inputs[0]) and not Path(inputs[0]).is_dir()
              and not is_folder(inputs[0]))
    rank = RankInfo.from_env()
    job = _Job(
        inputs=inputs, output=output, model=model, checkpoint=checkpoint, backbone=backbone,
        bands=bands, value_range=value_range, tile=tile, stride=stride, overlap=overlap,
        blend=blend, tta=tta, batch_size=batch_size, device=device, precision=precision,
        confidence=confidence, probabilities=probabilities,
        probabilities_dtype=probabilities_dtype, vector=vector, cog=cog, compress=compress,
        compile=compile, vector_min_area=vector_min_area,
        overwrite=overwrite, summary=summary, vrt=vrt, allow_random=allow_random_weights,
        rank=rank, aoi=area, mosaic_inputs=[], scene_label=None,
    )
    if mosaic:
        job.run_mosaic()
    elif remote and len(inputs) == 1 and not is_folder(inputs[0]):
        job.run_remote()
    elif single and rank.world == 1:
        job.run_single()
    elif single:
        job.run_split_scene()
    else:
        raise typer.Exit(job.run_folder())


class _Job:
    """The parsed command, with one method per way of running it."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    # -- shared set-up ------------------------------------------------------------------

    def template(self, output: Path, input_path: Path | None = None):
        from crossearth_cli.engine import SegmentSettings
        from crossearth_cli.raster.reader import parse_bands, parse_range

        return SegmentSettings(
            input=input_path or Path("."), output=output, tile=self.tile, stride=self.stride,
            blend=self.blend.lower(), tta=self.tta.lower(), bands=parse_bands(self.bands),
            value_range=parse_range(self.value_range, 3),
            batch_size=_parse_batch_size(self.batch_size),
            device=self.device, precision=self.precision,
            probabilities_dtype=self.probabilities_dtype.lower(), cog=self.cog,
            overwrite=self.overwrite, compress=self.compress.lower(), compile=self.compile,
            aoi=self.aoi,
        )

    def load_model(self, device: str):
        from crossearth_cli.engine import resolve_device
        from crossearth_cli.loading import resolve_model

        notes: list[str] = []
        spec = resolve_model(self.model, self.checkpoint, self.backbone,
                             device=str(resolve_device(device)),
                             allow_random=self.allow_random, notes=notes)
        if self.rank.rank == 0:
            if spec.random_weights:
                note("RANDOM WEIGHTS: the official weights are not available offline, so a "
                     "small random-weight model runs instead. The classes in the output mean "
                     "nothing.", style="bold yellow")
            for n in notes:
                note(n)
        return spec

    def finish_settings(self, settings, spec) -> None:
        """Fill what depends on the model: stride from --overlap."""
        from crossearth_cli.raster.windows import stride_from_overlap

        if self.overlap is not None:
            try:
                settings.stride = stride_from_overlap(settings.tile or spec.crop, self.overlap)
            except ValueError as exc:
                from crossearth_cli.errors import ConfigError

                raise ConfigError(f"--overlap {self.overlap:g}: {exc}",
                                  hint="give a smaller overlap: the tiles must move on") from None

    def check_reports(self, taken, single: bool) -> None:
        """--summary and --vrt, before any work: not over an input or another output."""
        from crossearth_cli.distributed import check_report_path

        taken = [p for p in taken if p is not None]
        if self.vrt and single and self.rank.rank == 0:
            note(f"--vrt {self.vrt}: a mosaic is made over several inputs; with one input "
                 "none is written")
        if self.summary:
            check_report_path(self.summary, "summary", self.overwrite, taken)
        if self.vrt and not single:
            check_report_path(self.vrt, "mosaic", self.overwrite,
                              [*taken, self.summary] if self.summary else taken)

    def check_aoi(self, src: Path) -> None:
        """--aoi on one input: refused before any work if it holds no pixel of it."""
        if self.aoi is None:
            return
        from crossearth_cli.raster.aoi import place_on_file

        place_on_file(self.aoi, src)

    def inside_aoi(self, items: list, outdir: Path, kinds: list[str]) -> list:
        """--aoi on a folder: the inputs it reaches. The others are left out, with a note
        (and listed in --summary as ``outside_aoi``); outputs of theirs from an earlier run
        are left as they are."""
        if self.aoi is None:
            return items
        from crossearth_cli.errors import ConfigError
        from crossearth_cli.raster.aoi import overlaps

        reached = [overlaps(self.aoi, it.path) for it in items]
        kept = [it for it, hit in zip(items, reached) if hit]
        if not kept:
            raise ConfigError(f"--aoi {self.aoi.label}: it holds no pixel of any of the "
                              f"{len(items)} input(s)",
                              hint="check the AOI's coordinates and CRS (--aoi-crs)")
        out = [it for it, hit in zip(items, reached) if not hit]
        self.outside_aoi = [it.rel.as_posix() for it in out]
        if out and self.rank.rank == 0:
            old = [it.rel.as_posix() for it in out
                   if any(p.exists() for p in it.outputs(outdir, kinds).values())]
            named = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
            note(f"--aoi: {len(out)} of {len(items)} input(s) lie outside it and are left out"
                 + (f"; {len(old)} of them ({named}) have outputs in {outdir} from an earlier "
                    "run, left as they are" if old else ""))
        return kept

    def vector_options(self, class_names):
        """What --vector makes of these classes (the preset's options, --vector-min-area)."""
        from crossearth_cli.vector.options import VectorizeOptions

        return VectorizeOptions.preset(class_names, overwrite=True,
                                       min_area=self.vector_min_area)

    def vectorize(self, spec, class_path: Path, out: Path, conf: Path | None) -> None:
        from crossearth_cli.vector import vectorize_raster

        opts = self.vector_options(spec.class_names)
        summary = vectorize_raster(class_path, out, opts, confidence_path=conf)
        for w in summary.warnings:
            note(w)

    # -- one file -----------------------------------------------------------------------

    def label(self, src: Path) -> str:
        """The scene's name in progress lines."""
        return self.scene_label or src.name

    def _single_paths(self):
        from crossearth_cli.engine import default_output_path

        src = Path(self.inputs[0])
        out = self.output or default_output_path(src)
        stem = out.stem[: -len("_classes")] if out.stem.endswith("_classes") else out.stem

        def derived(value: str | None, suffix: str) -> Path | None:
            if value is None:
                return None
            return out.with_name(stem + suffix) if value.lower() == AUTO else Path(value)

        return (src, out, derived(self.confidence, "_confidence.tif"),
                derived(self.probabilities, "_probabilities.tif"),
                derived(self.vector, ".gpkg"))

    def check_scene_outputs(self, settings, out: Path, conf, vec, job=None) -> None:
        """The outputs can be written (see ``engine.check_outputs``). A rerun that adds
        --vector to a scene whose rasters exist is refused as any existing output is, and told
        the ``crossearth vectorize`` command that makes the same GeoPackage from them."""
        from crossearth_cli.engine import check_outputs
        from crossearth_cli.errors import OutputError

        try:
            check_outputs(settings, job=job)
        except OutputError as exc:
            command = self.vectorize_command(out, conf, vec) if exc.path == str(out) else None
            if command is None:
                raise
            raise OutputError(str(exc), path=exc.path, hint="pass --overwrite to redo it, or "
                              f"make only the GeoPackage from it: {command}") from None

    def vectorize_command(self, out: Path, conf, vec) -> str | None:
        """``crossearth vectorize`` with the options --vector uses for the classes of ``out``
        (a class raster crossearth wrote), or None."""
        import shlex

        from crossearth_cli.errors import UserError
        from crossearth_cli.vector.source import open_class_raster

        if vec is None or vec.exists() or not out.is_file():
            return None
        try:
            names = list(open_class_raster(out).names.values())
        except UserError:
            return None
        if not names:  # not ours: its classes, and so the preset's options, are unknown
            return None
        opts = self.vector_options(names)  # `vectorize` picks the same classes by name
        words = ["crossearth", "vectorize", str(out), "-o", str(vec)]
        words += ["--regularize"] if opts.regularize else []
        words += ["--centerlines"] if opts.centerlines else []
        if conf is not None and conf.is_file():
            words += ["--confidence", str(conf)]
        if opts.min_area > 0:
            words += ["--min-area", repr(opts.min_area)]
        return shlex.join(words)

    def run_single(self) -> None:
        from crossearth_cli.engine import Session, validate_settings
        from crossearth_cli.raster.reader import probe_input
        from crossearth_cli.raster.writer import check_output_path
        from crossearth_cli.vector.writer import check_suffix

        src, out, conf, probs, vec = self._single_paths()
        settings = self.template(out, src)
        settings.confidence, settings.probabilities = conf, probs
        validate_settings(settings)
        probe_input(src, settings.bands)  # fail fast, before a model is loaded
        self.check_aoi(src)
        self.check_scene_outputs(settings, out, conf, vec)
        if vec is not None:
            check_suffix(vec)
            check_output_path(vec, self.overwrite, inputs=[src, *self.local_inputs()],
                              what="vector output")
        self.check_reports([src, out, conf, probs, vec], single=True)
        spec = self.load_model(self.device)
        self.finish_settings(settings, spec)
        with Session.for_settings(spec, settings, network=self.network) as session:
            scene = session.prepare(settings)
            with progress_events(self.label(src)) as events:
                result = session.run(scene, events=events)
        if vec is not None:
            self.vectorize(spec, out, vec, conf)
        _print_result(result, vec)
        if self.summary:
            from crossearth_cli.distributed import summary_json

            summary_json(self.summary, {**_result_dict(result), **self.mosaic_summary()})

    # -- one file split across torchrun ranks -------------------------------------------

    def run_split_scene(self) -> None:
        from crossearth_cli import distributed as dist
        from crossearth_cli.engine import validate_settings
        from crossearth_cli.raster.reader import probe_input
        from crossearth_cli.raster.writer import check_output_path
        from crossearth_cli.vector.writer import check_suffix

        rank = self.rank
        src, out, conf, probs, vec = self._single_paths()
        settings = self.template(out, src)
        settings.confidence, settings.probabilities = conf, probs
        validate_settings(settings)
        probe_input(src, settings.bands)
        self.check_aoi(src)
        self.check_scene_outputs(settings, out, conf, vec, job=(rank.rank, rank.world))
        if vec is not None:  # before the ranks segment, not when rank 0 vectorizes at the end
            check_suffix(vec)
            check_output_path(vec, self.overwrite, inputs=[src, *self.local_inputs()],
                              what="vector output")
        self.check_reports([src, out, conf, probs, vec], single=True)
        dist.init(rank)
        spec = self.load_model(dist.device_for(rank, self.device))
        self.finish_settings(settings, spec)
        finals = [p for p in (out, conf, probs) if p is not None]
        parts = {p: dist.part_path(p, rank.rank, rank.world) for p in finals}
        part_settings = dataclasses.replace(
            settings, output=parts[out], confidence=parts.get(conf) if conf else None,
            probabilities=parts.get(probs) if probs else None, overwrite=True,
            device=dist.device_for(rank, self.device),
        )
        try:
            outcomes = self._run_part(spec, settings, part_settings, src, out, conf, vec,
                                      finals)
        except BaseException:  # failed or interrupted: this rank's finished part goes too
            for final in finals:
                dist.part_path(final, rank.rank, rank.world).unlink(missing_ok=True)
            raise
        if rank.rank == 0:
            written = [r for _, r in outcomes if r is not None]
            merged = _merge_part_results(written, out, finals[1:])
            _print_result(merged, vec, ranks=rank.world)
            if self.summary:
                dist.summary_json(self.summary, {**_result_dict(merged), "ranks": rank.world,
                                                 **self.mosaic_summary()})

    def _run_part(self, spec, settings, part_settings, src, out, conf, vec, finals) -> list:
        """This rank's row part, then (rank 0) the merge and vectors; every rank's outcome."""
        from crossearth_cli import distributed as dist
        from crossearth_cli.engine import RowPart, Session

        rank = self.rank
        error = None
        result = None
        try:
            with Session.for_settings(spec, part_settings, network=self.network) as session:
                scene = session.prepare(part_settings, part=RowPart(rank.rank, rank.world))
                if scene.rows.y1 > scene.rows.y0:
                    # rank 0 shows its own rows' progress: the others' tiles are not counted
                    label = f"{self.label(src)} [rows of rank {rank.rank} of {rank.world}]"
                    with progress_events(label) as events:
                        result = session.run(scene, events=events if rank.rank == 0 else None)
                else:  # fewer tile rows than ranks: this rank has none, and writes no part
                    scene.close()
        except Exception as exc:  # noqa: BLE001 - every rank must learn about it
            from crossearth_cli.batch import _reason

            error = _reason(exc)
        outcomes = dist.all_gather((error, result), rank)
        errors = [e for e, _ in outcomes if e]
        written = [i for i, (_, r) in enumerate(outcomes) if r is not None]
        if rank.rank == 0 and not errors:
            dist.merge_row_parts(
                {final: [dist.part_path(final, i, rank.world) for i in written]
                 for final in finals}, cog=self.cog, compress=self.compress.lower())
            if vec is not None:
                self.vectorize(spec, out, vec, conf)
        dist.shutdown(rank)
        if errors:  # the caller removes this rank's part
            from crossearth_cli.errors import UserError

            raise UserError(errors[0])
        return outcomes

    # -- the tiles of one mosaic, as one scene -------------------------------------------

    def run_mosaic(self) -> None:
        """--mosaic: the inputs put on one grid by a VRT, then run as one scene (split into
        row bands under torchrun)."""
        from crossearth_cli.errors import ConfigError

        if self.vrt is not None:
            raise ConfigError("--vrt mosaics the outputs of a folder run; --mosaic already "
                              "writes one raster", hint="leave out --vrt")
        out = self.output or Path("mosaic_classes.tif")
        if out.suffix.lower() not in (".tif", ".tiff") or out.is_dir():
            raise ConfigError(f"-o {out}: --mosaic writes one raster",
                              hint="give -o a file name ending in .tif")
        self.output = out
        headers = self._mosaic_headers()
        self._run_through_vrt(headers, f"the mosaic of {len(headers)} inputs")

    def run_remote(self) -> None:
        """One raster on a server: read through a VRT naming its GDAL path, so that the
        scene's code (written for local paths) reads it window by window, as --mosaic does
        its tiles. Outputs go to the current folder unless -o says otherwise."""
        from crossearth_cli.engine import default_output_path
        from crossearth_cli.raster.mosaic import read_header
        from crossearth_cli.raster.remote import file_name, file_stem

        url = self.inputs[0]
        self.output = self.output or default_output_path(Path(file_stem(url) + ".tif"))
        self._run_through_vrt([read_header(url)], url, label=file_name(url))

    def _run_through_vrt(self, headers: list, name: str, label: str | None = None) -> None:
        """Run the scene a VRT makes of ``headers`` (the whole scene, or row bands under
        torchrun); errors and progress name ``name``, not the temporary VRT."""
        import tempfile

        from crossearth_cli.errors import UserError
        from crossearth_cli.raster.mosaic import write_input_vrt
        from crossearth_cli.raster.reader import ReadFailed, server_busy_error
        from crossearth_cli.raster.remote import gdal_path, is_remote

        paths = [h.path for h in headers]
        with tempfile.TemporaryDirectory(prefix="crossearth-mosaic-") as tmp:
            vrt = Path(tmp) / f"mosaic-of-{len(paths)}-inputs.vrt"
            grid = write_input_vrt(headers, vrt, bands_given=self.bands is not None)
            if grid.covered < 0.5 and self.rank.rank == 0:
                note(f"--mosaic: the {len(paths)} inputs cover {grid.covered:.0%} of their "
                     f"bounding box ({grid.width}x{grid.height} px), which the outputs cover "
                     "whole, nodata between them; for scattered files, leave out --mosaic")
            self.inputs, self.mosaic_inputs = [str(vrt)], paths
            self.scene_label = label or name.removeprefix("the ")
            try:
                self.run_split_scene() if self.rank.world > 1 else self.run_single()
            except UserError as exc:  # name the inputs, not the temporary VRT
                if isinstance(exc, ReadFailed):  # a tile on a server that stayed busy?
                    for url in (p for p in paths if is_remote(p)):
                        busy = server_busy_error(exc.what, url)
                        if busy is not None:
                            raise busy from exc
                text = str(exc).replace(str(vrt), name)
                for url in (p for p in paths if is_remote(p)):  # nor GDAL's paths for URLs
                    text = text.replace(gdal_path(url), url)
                exc.args = (text,)
                if exc.path == str(vrt):
                    exc.path = name
                raise

    @property
    def network(self) -> bool:
        """Whether the scene is read from a server (a URL, or a mosaic with URLs among its
        tiles): more reader threads, each a request in flight."""
        from crossearth_cli.raster.remote import is_remote

        return any(is_remote(p) for p in self.mosaic_inputs)

    def local_inputs(self) -> list[Path]:
        """The inputs on this machine's disk (an output must not replace one)."""
        from crossearth_cli.raster.remote import is_remote

        return [Path(p) for p in self.mosaic_inputs if not is_remote(p)]

    def _mosaic_headers(self) -> list:
        """The inputs' headers, less rasters crossearth wrote found in an input folder
        (outputs of an earlier run: never imagery); an output that would replace a real
        input is refused."""
        from crossearth_cli.batch import Listing, expand_inputs
        from crossearth_cli.errors import OutputError
        from crossearth_cli.raster.mosaic import read_header
        from crossearth_cli.raster.remote import is_remote
        from crossearth_cli.raster.writer import same_path

        _, out, conf, probs, _ = self._single_paths()
        outputs = {"-o": out, "--confidence": conf, "--probabilities": probs}
        listing = Listing()  # outputs found by listing a folder are left out there
        local = [text for text in self.inputs if not is_remote(text)]
        found = expand_inputs(local, listing=listing) if local else []
        headers, ours = [], len(listing.ours)
        for it in found:
            named = str(it.path) in self.inputs
            clash = next((o for o, p in outputs.items() if p and same_path(it.path, p)), None)
            header = read_header(it.path)
            if clash is not None and (named or not header.written_by_crossearth):
                raise OutputError(f"the {clash} output of --mosaic is one of its inputs",
                                  path=it.path, hint=f"choose another {clash} path")
            if clash is not None or (not named and header.written_by_crossearth):
                ours += 1
                continue
            headers.append(header)
        # URLs after the local files, in the order given (the later wins where tiles overlap)
        urls = [text for text in self.inputs if is_remote(text)]
        headers += [read_header(it.path) for it in (expand_inputs(urls) if urls else ())]
        if ours and self.rank.rank == 0:
            note(f"--mosaic: left out {ours} raster(s) that crossearth wrote, found among the "
                 "inputs")
        if not headers:
            from crossearth_cli.errors import InputError

            raise InputError("holds no raster but crossearth's own outputs",
                             path=self.inputs[0], hint="give the folder of the tiles")
        return headers

    def mosaic_summary(self) -> dict:
        return {"inputs": [str(p) for p in self.mosaic_inputs]} if self.mosaic_inputs else {}

    # -- folders, globs, many files ------------------------------------------------------

    def run_folder(self) -> int:
        from crossearth_cli.batch import (
            BatchResult,
            Listing,
            Manifest,
            check_output_names,
            expand_inputs,
            split_for_rank,
        )
        from crossearth_cli.errors import ConfigError

        rank = self.rank
        for name, value in (("--confidence", self.confidence),
                            ("--probabilities", self.probabilities), ("--vector", self.vector)):
            if value is not None and value.lower() != AUTO:
                raise ConfigError(
                    f"{name} {value}: with several inputs, output names are derived",
                    hint=f"use {name} auto (INPUT{_suffix(name)} under the output folder)",
                )
        outdir = self.output or Path("crossearth_out")
        listing = Listing()  # a folder without rasters: said first
        items = expand_inputs(self.inputs, exclude=outdir, listing=listing)
        if outdir.suffix.lower() in (".tif", ".tiff") and not outdir.is_dir():
            raise ConfigError(f"-o {outdir}: with several inputs, -o names a folder")
        if rank.rank == 0:
            _tell_listing(listing)
        if not items and listing.ours:
            raise ConfigError(
                f"every raster found is an output of an earlier crossearth run (first: "
                f"{listing.ours[0]})", hint="give the folder of the images")
        if not items:
            raise ConfigError(
                f"-o {outdir}: every input is inside the output folder, so nothing is left to do",
                hint="choose an output folder outside the inputs",
            )
        kinds = ["classes"] + [k for k, v in (("confidence", self.confidence),
                                             ("probabilities", self.probabilities),
                                             ("vector", self.vector)) if v]
        items = self.inside_aoi(items, outdir, kinds)
        check_output_names(items, outdir)
        manifest = Manifest(outdir, rank.rank, rank.world)
        self.not_given = self.done_before_not_given(manifest, items, outdir)
        taken = [manifest.path] + [it.path for it in items]
        taken += [p for it in items for p in it.outputs(outdir, kinds).values()]
        self.check_reports(taken, single=False)
        from crossearth_cli.engine import validate_settings
        from crossearth_cli.raster.writer import ensure_writable_folder, lock_output

        validate_settings(self.template(outdir / "x.tif"))  # before the folder is made
        ensure_writable_folder(manifest.path)
        # a second run into this folder is refused, not raced: single runs and torchrun jobs
        # alike take the folder's own manifest lock (a job's ranks share it), ranks their own
        for path in dict.fromkeys((Manifest.path_for(outdir), manifest.path)):
            lock_output(path)
        try:  # over the network this takes a while (fingerprints): a stop here is told too
            todo, keys, vectors_only = self.folder_todo(items, outdir, kinds, manifest)
        except KeyboardInterrupt as exc:
            if rank.world == 1:
                self.report_interrupted(exc, BatchResult(), items, items, outdir, manifest,
                                        checking=True)
            raise
        if not todo:  # every rank sees the same manifests: nothing to load, nothing to run
            total = BatchResult(skipped=[manifest.key(it) for it in items])
            return self.report_folder(total, items, outdir)
        return self.run_folder_work(items, todo, outdir, kinds, keys, manifest,
                                    split_for_rank(items, rank.rank, rank.world),
                                    set(vectors_only))

    def folder_todo(self, items, outdir: Path, kinds, manifest) -> tuple[list, tuple, list]:
        """(the inputs to run, their resume keys (all outputs; rasters alone, with --vector),
        the keys of those whose rasters are current and need only their GeoPackage). Inputs
        an earlier run made with these settings and more outputs are done: they are not
        among those to run (their other outputs are left as they are)."""
        import functools

        from crossearth_cli.batch import OUTPUT_SUFFIXES, settings_hash

        if self._shared_range():  # every stretch depends on every input, URLs' included
            manifest.fetch_fingerprints(items)

        @functools.cache
        def key_for(some: tuple[str, ...]) -> str:
            return settings_hash(self.request_key(list(some), items, manifest))

        def key_of(some: list[str]) -> str:
            return key_for(tuple(some))

        key = key_of(kinds)
        rasters = [kind for kind in kinds if kind != "vector"]
        raster_key = key_of(rasters) if "vector" in kinds else None
        if not self.overwrite:  # URLs that ran before: their fingerprints, fetched side by side
            manifest.fetch_fingerprints(
                manifest.finished_before(items, key, raster_key)
                + [it for it in items if manifest.made_with_more(it, kinds, key_of)])

        fewer = []  # made before with more outputs

        def current(it) -> bool:
            outs = it.outputs(outdir, kinds)
            if manifest.is_current(it, key, outs):
                return True
            if manifest.current_with_more(it, kinds, key_of, outs):
                fewer.append(it)
                return True
            return False

        todo = [it for it in items if self.overwrite or not current(it)]
        if fewer and self.rank.rank == 0:
            more = sorted({k for it in fewer for k in manifest.records[manifest.key(it)].outputs}
                          - set(kinds), key=list(OUTPUT_SUFFIXES).index)
            note(f"{len(fewer)} file(s) were made by an earlier run with these settings and "
                 f"more outputs ({', '.join(more)}): nothing to do for them, and those outputs "
                 "are left as they are")
        # rasters current, the GeoPackage missing or made with other options: only that
        vectors_only = [] if raster_key is None or self.overwrite else [
            manifest.key(it) for it in todo
            if manifest.rasters_current(it, raster_key, it.outputs(outdir, rasters))]
        return todo, (key, raster_key), vectors_only

    def run_folder_work(self, items, todo, outdir, kinds, keys, manifest, mine,
                        vectors_only: set[str]) -> int:
        import time

        from crossearth_cli import distributed as dist
        from crossearth_cli.batch import BatchResult, results_since, run_batch
        from crossearth_cli.engine import Session, validate_settings

        rank = self.rank
        key, raster_key = keys
        started = time.time()  # what the manifests record after this, this job finished
        dist.init(rank)
        device = dist.device_for(rank, self.device)
        result = BatchResult()
        todo_keys = {manifest.key(it) for it in todo}
        result.skipped += [k for k in map(manifest.key, mine) if k not in todo_keys]
        mine = [it for it in mine if manifest.key(it) in todo_keys]
        try:
            if vectors_only and rank.rank == 0:
                note(f"--vector: {len(vectors_only)} file(s) keep their rasters from an earlier "
                     "run with these settings; only their GeoPackages are made (--overwrite "
                     "redoes everything)")
            mine_derived = [it for it in mine if manifest.key(it) in vectors_only]
            if mine_derived:
                self.vectors_from_rasters(mine_derived, outdir, kinds, keys, manifest, result)
            if len(vectors_only) == len(todo):  # no file needs the model: none is loaded
                return self.finish_folder(result, items, outdir)
            mine = [it for it in mine if manifest.key(it) not in vectors_only]
            spec = self.load_model(device)
            if spec.random_weights:  # never "current": a rerun with real weights must redo it
                key, raster_key = (k and k + "-random-weights" for k in keys)
            template = self.template(outdir / "placeholder.tif")
            template.device = device
            self.finish_settings(template, spec)
            validate_settings(template)
            if template.value_range == "shared":
                template.value_range = self.shared_range(items, template.bands, spec.band_order)

            def after_scene(res, outs):
                if "vector" in outs:
                    self.vectorize(spec, outs["classes"], outs["vector"], outs.get("confidence"))

            with Session.for_settings(spec, template, device=device,
                                      network=any(it.remote for it in mine)) as session:
                with _BatchProgress(len(todo) - len(vectors_only), rank, manifest,
                                    told=result.notes) as events:
                    run_batch(mine, outdir, template, session, kinds, key, manifest,
                              after_scene=after_scene, events=events, result=result,
                              raster_key=raster_key)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: say where it stopped, then stop
            if rank.world == 1:
                self.report_interrupted(exc, result, items, todo, outdir, manifest)
            elif rank.rank == 0:  # torchrun stops every rank: rank 0 tells all ranks' work
                everyone = results_since(manifest.read_all(), started,
                                         {manifest.key(it) for it in todo})
                self.report_interrupted(exc, everyone, items, todo, outdir, manifest,
                                        ranks=rank.world)
            raise
        return self.finish_folder(result, items, outdir)

    def vectors_from_rasters(self, items, outdir: Path, kinds, keys, manifest, result) -> None:
        """The GeoPackages of files whose rasters are current (made by an earlier run with
        these settings, without --vector or with other vector options, or stopped while
        vectorizing): made from those rasters, with no model. Recorded as done."""
        import time

        t0 = time.perf_counter()
        try:
            self._vectors_each(items, outdir, kinds, keys, manifest, result)
        finally:  # a stop too: the summary's seconds are those spent
            spent = time.perf_counter() - t0
            result.seconds += spent
            result.vectors_only_seconds += spent

    def _vectors_each(self, items, outdir: Path, kinds, keys, manifest, result) -> None:
        import time

        from crossearth_cli.batch import _fail
        from crossearth_cli.vector import vectorize_raster
        from crossearth_cli.vector.source import open_class_raster

        key, raster_key = keys
        for it in items:
            outs = it.outputs(outdir, kinds)
            old = manifest.records[manifest.key(it)]
            t1 = time.perf_counter()
            try:
                names = open_class_raster(outs["classes"]).names  # as the model's, in its tags
                opts = self.vector_options(list(names.values()))
                summary = vectorize_raster(outs["classes"], outs["vector"], opts,
                                           confidence_path=outs.get("confidence"))
                for w in summary.warnings:
                    note(w)
                rec = manifest.done_record(it, key, outs, old.pixels,
                                           time.perf_counter() - t1, window=old.window,
                                           raster_settings=raster_key)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                _fail(manifest, result, it, key, exc, lambda kind, data: None)
                note(_failure(manifest.key(it), result.failed[-1].reason), style="red")
                continue
            manifest.append(rec)
            result.done.append(rec)
            result.vectors_only.append(rec.input)

    def finish_folder(self, result, items, outdir: Path) -> int:
        """Every rank's results gathered; rank 0 reports. The exit code, the same on all."""
        from crossearth_cli import distributed as dist

        rank = self.rank
        gathered = dist.all_gather(result, rank)
        code = 0
        if rank.rank == 0:
            total = gathered[0]
            for other in gathered[1:]:
                total.merge(other)
            code = self.report_folder(total, items, outdir)
        codes = dist.all_gather(code, rank)
        dist.shutdown(rank)
        return max(codes)

    def done_before_not_given(self, manifest, items, outdir: Path) -> list[str]:
        """Inputs an earlier run into ``outdir`` finished whose outputs are still there, though
        this run was not given them (deleted, moved, or a narrower glob): left as they are,
        and told, so that a folder kept in step with its inputs can be tidied."""
        given = {manifest.key(it) for it in items} | set(getattr(self, "outside_aoi", ()))
        return sorted(key for key, rec in manifest.records.items()
                      if rec.status == "done" and key not in given
                      and any((outdir / o["path"]).exists() for o in rec.outputs.values()))

    def shared_range(self, items, bands, band_order):
        """--range shared: one stretch from all inputs (every rank samples them alike)."""
        from crossearth_cli.raster.shared_range import shared_scaling

        shared = shared_scaling([it.path for it in items], bands, band_order)
        self.shared_limits = [[s.low, s.high] if s.sampled else None for s in shared.scaling]
        if self.rank.rank == 0:
            if not shared.files:
                note("--range shared: no input to take a stretch from (8-bit, paletted and "
                     "unreadable inputs are left out; 8-bit ones are used as they are)")
            elif not any(s.sampled for s in shared.scaling):
                note(f"--range shared: no valid pixel was found in the {shared.files} "
                     "input(s) sampled: they look like nodata everywhere")
            else:  # repr: the shortest text that reads back as the same float
                limits = ",".join(repr(v) for s in shared.scaling for v in (s.low, s.high))
                note(f"--range shared: one stretch for {shared.files} input(s), from the 2-98 % "
                     f"percentiles of their values together: {limits} (MIN,MAX per channel; "
                     f"--range {limits} reuses it)")
        return shared

    def report_folder(self, total, items, outdir: Path) -> int:
        """Rank 0: the table, --summary and --vrt. Returns the exit code."""
        from crossearth_cli import distributed as dist
        from crossearth_cli.errors import EXIT_PARTIAL

        if self.rank.rank != 0:
            return 0
        _print_batch(total, self.rank.world)
        if self.not_given:
            note(f"{outdir} holds the outputs of {len(self.not_given)} input(s) an earlier run "
                 f"finished that this run was not given ({', '.join(self.not_given[:3])}"
                 f"{', ...' if len(self.not_given) > 3 else ''}); left as they are "
                 "(--summary lists them under not_given)")
        if self.summary:
            dist.summary_json(self.summary, {**total.as_dict(), "ranks": self.rank.world,
                                             "outdir": str(outdir), **self.summary_extra()})
        if self.vrt:
            done = [it.outputs(outdir, ["classes"])["classes"] for it in items]
            done = [p for p in done if p.exists()]
            if done:
                _, notes = dist.write_mosaic_vrt(done, self.vrt)
                for n in notes:
                    note(n)
        return EXIT_PARTIAL if total.failed else 0

    def summary_extra(self) -> dict:
        """--summary's keys for the options that were given (folder runs)."""
        limits = getattr(self, "shared_limits", None)  # set when --range shared ran
        extra = {"shared_range": limits} if limits is not None else {}
        if self.aoi is not None:
            extra["outside_aoi"] = self.outside_aoi
        if self.not_given:
            extra["not_given"] = self.not_given
        return extra

    def report_interrupted(self, exc, result, items, todo, outdir: Path, manifest,
                           checking: bool = False, ranks: int = 1) -> None:
        """A folder run stopped by Ctrl-C or SIGTERM (one process, or rank 0 of ``ranks`` with
        every rank's records): the files finished by then keep their outputs and manifest
        records; this says how far it got, and --summary is written, marked ``interrupted``,
        for the script or scheduler that started it. ``checking``: stopped while finding which
        files are done, before any ran."""
        from crossearth_cli import distributed as dist

        keys = [manifest.key(it) for it in todo]
        ended = {r.input for r in result.done + result.failed}
        not_run = [k for k in keys if k not in ended]
        if not result.skipped:  # stopped before the run listed them
            todo_keys = set(keys)
            result.skipped = [k for k in map(manifest.key, items) if k not in todo_keys]
        name = getattr(exc, "signal_name", "SIGINT")
        failed = f", {len(result.failed)} failed" if result.failed else ""
        told = (f" (--summary {self.summary} lists the files not run under not_run)"
                if self.summary else "")
        if checking:
            note(f"stopped ({name}) while checking which of {len(todo)} file(s) an earlier run "
                 f"finished: none was run; the same command again does the work{told}")
        else:
            by = f" by {ranks} ranks" if ranks > 1 else ""
            note(f"stopped ({name}) after {len(result.done)} of {len(todo)} file(s){failed}{by}"
                 f": their outputs are kept; the same command again does the rest{told}")
        if self.summary:
            try:
                dist.summary_json(self.summary, {**result.as_dict(), "ranks": ranks,
                                                 "outdir": str(outdir), "interrupted": name,
                                                 "not_run": not_run, **self.summary_extra()})
            except OSError as err:  # the stop is still what is reported
                note(f"--summary {self.summary}: not written ({err.strerror or err})")

    def _shared_range(self) -> bool:
        return (self.value_range or "").strip().lower() == "shared"

    def request_key(self, kinds: list[str], items=(), manifest=None) -> dict:
        """Every request setting that changes the numbers in the outputs (resume decisions).

        Computed from the command line and the inputs' sizes and times alone (URLs'
        fingerprints, from ``manifest``), so a rerun with nothing to do loads no model. With
        --range shared every input's stretch depends on all the inputs, so any change among
        them redoes every file.
        """
        def identity(path: Path | None):
            if path is None:
                return None
            try:
                st = Path(path).stat()
                return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
            except OSError:
                return str(path)

        def input_identity(it):
            if not it.remote or manifest is None:
                return identity(it.path)
            try:  # by its name in the run, not its URL: a signed URL's query changes
                return [manifest.key(it), manifest.identity(it)["fingerprint"]]
            except Exception:  # noqa: BLE001 - it fails when it runs, named
                return manifest.key(it)

        from crossearth_cli.batch import settings_hash
        from crossearth_cli.loading import DEFAULT_MODEL

        return {
            "model": None if self.checkpoint else (self.model or DEFAULT_MODEL),
            "checkpoint": identity(self.checkpoint), "backbone": identity(self.backbone),
            "tile": self.tile, "stride": self.stride, "overlap": self.overlap,
            "blend": self.blend.lower(), "bands": self.bands, "range": self.value_range,
            **({"tta": self.tta.lower()} if self.tta.lower() != "none" else {}),
            **({"aoi": self.aoi.fingerprint} if self.aoi is not None else {}),
            "device": self.device, "precision": self.precision, "outputs": kinds,
            **({"vector_min_area": self.vector_min_area}
               if "vector" in kinds and self.vector_min_area > 0 else {}),
            "probabilities_dtype": self.probabilities_dtype.lower(), "cog": self.cog,
            "compress": self.compress.lower(), "random_allowed": self.allow_random,
            **({"shared_range_inputs": settings_hash([input_identity(it) for it in items])}
               if self._shared_range() else {}),
        }


def _parse_batch_size(text: str) -> int | str:
    from crossearth_cli.errors import ConfigError

    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--batch-size {text!r}: give a number of tiles or auto") from None
    if value < 1:
        raise ConfigError("--batch-size must be at least 1")
    return value


def _tell_listing(listing) -> None:
    """What a folder's listing set aside: earlier outputs found among the inputs, and links
    to files that are run as those files."""
    if listing.ours:
        note(f"left out {len(listing.ours)} raster(s) that crossearth wrote, found among the "
             f"inputs (first: {listing.ours[0]})")
    for link, target in listing.links:
        note(f"{link} is a link to {target}, which is segmented (once, under its own name)")


def _suffix(option: str) -> str:
    from crossearth_cli.batch import OUTPUT_SUFFIXES

    return OUTPUT_SUFFIXES[option.removeprefix("--")]


def _result_dict(result) -> dict:
    return {
        "output": str(result.output), "width": result.width, "height": result.height,
        "pixels": result.pixels, "seconds": round(result.seconds, 3),
        "mpx_per_s": round(result.mpx_per_s, 4), "tiles": result.tiles,
        "tiles_skipped": result.tiles_skipped, "device": result.device,
        "precision": result.precision, "tta": result.tta, "batch_size": result.batch_size,
        "class_shares": result.class_shares(), "nodata_pixels": result.nodata_pixels,
        **({"window": dict(zip(("col_off", "row_off", "width", "height"), result.window))}
           if result.window is not None else {}),
    }


def _merge_part_results(parts: list, output: Path, extra: list[Path]):
    """One result for a scene run in row parts by torchrun ranks, as one process reports it:
    the final outputs, class and nodata pixels summed; tiles are those the ranks ran (tile
    rows overlapping a part's top edge run on both sides of it)."""
    import numpy as np

    first = parts[0]
    height = sum(p.height for p in parts)
    return dataclasses.replace(
        first, output=output, height=height,
        window=(*first.window[:3], height) if first.window else None,
        tiles=sum(p.tiles for p in parts), tiles_skipped=sum(p.tiles_skipped for p in parts),
        seconds=max(p.seconds for p in parts),
        class_pixels=np.sum([p.class_pixels for p in parts], axis=0),
        nodata_pixels=sum(p.nodata_pixels for p in parts), extra_outputs=list(extra),
    )


def _print_result(result, vector: Path | None, ranks: int = 1) -> None:
    counts = [f"{name} {share:.1%}" for name, share in result.class_shares().items() if share > 0]
    if result.nodata_pixels:
        counts.append(f"nodata {result.nodata_pixels / result.pixels:.1%}")
    extra = "".join(f" + {p}" for p in result.extra_outputs) + (f" + {vector}" if vector else "")
    how = result.precision + (f", tta {result.tta}" if result.tta != "none" else "")
    where = f"{result.device} ({how})" + (f" over {ranks} ranks" if ranks > 1 else "")
    out_console().print(
        f"{result.output}{extra}: {result.width}x{result.height} px "
        f"({result.pixels / 1e6:.2f} Mpx) in {result.seconds:.1f} s, "
        f"{result.mpx_per_s:.2f} Mpx/s on {where}" + (f"; {', '.join(counts)}" if counts else ""),
        highlight=False,
    )


def _print_batch(total, world: int) -> None:
    from rich.table import Table

    table = Table(title=f"crossearth segment: {world} rank(s)" if world > 1 else None)
    columns = ["files done", "skipped", "failed", "Mpx", "time (s)", "Mpx/s"]
    segmented = len(total.done) - len(total.vectors_only)
    row = [str(len(total.done)), str(len(total.skipped)), str(len(total.failed)),
           f"{total.pixels / 1e6:.2f}", f"{total.seconds:.1f}",
           "-" if total.vectors_only and not segmented  # no model ran: no speed to tell
           else f"{total.mpx_per_s:.2f}"]
    if total.vectors_only:  # of the files done, those whose GeoPackage alone was made
        columns.insert(1, "GeoPackage only")
        row.insert(1, str(len(total.vectors_only)))
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(*row)
    console = out_console()
    console.print(table)
    if total.failed and world == 1 and one_log():  # each was told as it failed, just above
        console.print(f"failed: {len(total.failed)} file(s), each named above with its reason",
                      highlight=False)
        return
    for rec in total.failed:
        console.print(f"failed: {_failure(rec.input, rec.reason)}", highlight=False)


def _failure(name: str, reason: str) -> str:
    """``name: reason``, unless the reason already starts with the file's path."""
    head = reason.split(": ", 1)[0]
    return reason if head == name or head.endswith("/" + name) else f"{name}: {reason}"


class _BatchProgress:
    """A files progress bar on rank 0 over every rank's work: it counts the records all
    ranks append to their manifests, so no extra messages travel between processes."""

    def __init__(self, total: int, rank, manifest, told: dict[str, list[str]]):
        self.total, self.rank, self.manifest = total, rank, manifest
        self._stop = None
        self._input = ""
        self._names: dict[str | None, str] = {}  # input path → its name in the manifest
        self.told = told  # notes about outputs (no CRS...) → the files they concern

    def __enter__(self):
        import sys
        import threading
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from crossearth_cli.cli.console import err_console

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("files"), console=err_console(), transient=True,
            disable=self.rank.rank != 0 or not sys.stderr.isatty(),
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("segment", total=self.total)
        self.log = LogProgress()  # lines for a log, where the bar is not drawn
        self.log.on = self.log.on and self.rank.rank == 0
        self._files = {"done": 0, "failed": 0}
        self._tiles = {"done": 0, "total": 0}
        if self.rank.world > 1 and self.rank.rank == 0:
            self._stop = threading.Event()
            start = time.time()
            threading.Thread(target=self._poll, args=(start,), daemon=True).start()
        return self.events

    def _poll(self, start: float) -> None:
        while not self._stop.wait(1.0):
            n = sum(rec.finished >= start for rec in self.manifest.read_all())
            self.progress.update(self.task, completed=n)
            if self.log.due():
                self.log.say(f"{n:,} of {self.total:,} files finished by all ranks, "
                             f"{duration(self.log.elapsed())} in")

    def _log_line(self) -> None:
        files = self._files["done"] + self._files["failed"]
        failed = f", {self._files['failed']:,} failed" if self._files["failed"] else ""
        now = ""
        if self._input and self._tiles["total"] > 1:
            now = f"; now {self._input}: {self._tiles['done']:,}/{self._tiles['total']:,} tiles"
        elif self._input:
            now = f"; now {self._input}"
        self.log.say(f"{files:,} of {self.total:,} files{failed}, "
                     f"{duration(self.log.elapsed())} in{now}")

    def events(self, kind: str, data: dict) -> None:
        if kind == "file_start":
            self._input = str(data["input"])
            self._names[data.get("path")] = self._input
            self.progress.update(self.task, description=self._input)
        elif kind == "note" and (data.get("outputs") or data.get("key")):
            # what users must know of their outputs (no CRS, no georeferencing, guessed
            # bands), once per kind; the other per-file set-up notes (scaling: the limits are
            # in each output's tags) would drown a long run. Files of a group start together,
            # so the note names its own file, not the last started
            message = data["message"]
            name = self._names.get(data.get("path"), self._input)
            if message not in self.told:
                note(f"{name}: {message}")
            self.told.setdefault(message, []).append(name)
        elif kind in ("file_done", "file_failed") and self._stop is None:
            self.progress.advance(self.task)
        if kind == "file_failed":
            note(_failure(data["input"], data["reason"]), style="red")
        self._count(kind, data)

    def _count(self, kind: str, data: dict) -> None:
        """Files and the current file's tiles, for the log's progress lines."""
        if kind == "start":
            self._tiles.update(done=0, total=data["tiles"])
        elif kind == "advance":
            self._tiles["done"] += data["tiles"]
        elif kind in ("file_done", "file_failed"):
            self._files["done" if kind == "file_done" else "failed"] += 1
        else:
            return
        if self._stop is None and self.log.due():
            self._log_line()

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
        self.progress.__exit__(*exc)
        for message, names in self.told.items():
            if len(names) > 1:
                listed = ", ".join(names[1:4]) + (", ..." if len(names) > 4 else "")
                note(f"likewise for {len(names) - 1} more file(s) ({listed}; --summary FILE "
                     f"lists every file under notes): {message}")
