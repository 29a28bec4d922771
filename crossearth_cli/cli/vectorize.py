"""``crossearth vectorize``: class raster → GeoPackage layers. Parses options, calls the library."""

from __future__ import annotations

from pathlib import Path

import typer

from crossearth_cli.cli.app import app


@app.command("vectorize")
def vectorize_command(
    classes_path: str = typer.Argument(
        ..., metavar="CLASSES.tif", help="Class raster (e.g. from `crossearth segment`), any "
        "size; a file, or a URL (https://, s3://, gs://, az://) read window by window."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="GeoPackage to write (.gpkg)."),
    classes: list[str] | None = typer.Option(
        None, "--classes", help="Classes to vectorize, by name or id, comma-separated or "
        "repeated (building,road or 1,2). Default: all but nodata."
    ),
    min_area: float = typer.Option(
        0.0, "--min-area", help="Drop polygons smaller than this many m² (after seams are "
        "merged, in true ground area)."
    ),
    fill_holes: float = typer.Option(
        0.0, "--fill-holes", help="Enclosed regions smaller than this many m² take the class "
        "around them (holes filled, specks inside absorbed)."
    ),
    simplify: float = typer.Option(
        0.0, "--simplify", help="Simplify outlines by about this many metres, keeping shared "
        "edges shared (no gaps, no overlaps). 0 keeps exact pixel edges."
    ),
    connectivity: int = typer.Option(
        4, "--connectivity", help="4: pixels touching at a corner are separate polygons; "
        "8: they join."
    ),
    regularize: bool = typer.Option(
        False, "--regularize", help="Square up building outlines (classes named *building*, "
        "or all selected classes if none is)."
    ),
    centerlines: bool = typer.Option(
        False, "--centerlines", help="Also write road centerlines with length_m (classes named "
        "*road*, or all selected classes if none is)."
    ),
    layer_per_class: bool = typer.Option(
        True, "--layer-per-class/--single-layer", help="One layer per class, or one 'polygons' "
        "layer with class_id/class_name attributes."
    ),
    confidence: str | None = typer.Option(
        None, "--confidence", help="Confidence raster on the same grid (a file or a URL): adds "
        "mean_confidence."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    window: int = typer.Option(
        1024, "--window", help="Window size in pixels; memory grows with width × window."
    ),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0 = automatic)."),
) -> None:
    """Turn a class raster into GeoPackage polygons (and road centerlines), window by window."""
    from crossearth_cli.cli.console import err_console, note, out_console
    from crossearth_cli.vector import VectorizeOptions, vectorize_raster

    options = VectorizeOptions(  # checks every option (--connectivity 4 or 8, ...)
        classes=classes or None,
        min_area=min_area,
        fill_holes=fill_holes,
        simplify=simplify,
        connectivity=connectivity,
        regularize=regularize,
        centerlines=centerlines,
        layer_per_class=layer_per_class,
        overwrite=overwrite,
        window_size=window,
        workers=workers,
    )
    inputs = [_input(classes_path), None if confidence is None else _input(confidence)]
    with _progress(err_console()) as progress:
        summary = vectorize_raster(
            inputs[0], output, options, confidence_path=inputs[1], progress=progress
        )
    for w in summary.warnings:
        note(w)
    parts = ", ".join(f"{name} {n}" for name, n in summary.layers.items())
    out_console().print(
        f"wrote {summary.out_path}: {parts} ({summary.seconds:.1f} s, {summary.windows} "
        f"window{'s' if summary.windows != 1 else ''}, areas {summary.area_mode})",
        markup=False,
    )


def _input(text: str) -> Path | str:
    """A local path, or a URL kept as typed (a ``Path`` folds ``https://`` into ``https:/``);
    a URL also sets GDAL's network defaults (see ``raster.remote``)."""
    from crossearth_cli.raster.remote import is_remote, use_network_defaults

    if not is_remote(text):
        return Path(text)
    use_network_defaults()
    return text


class _progress:
    """A rich progress bar over windows on stderr, silent when stderr is not a terminal."""

    def __init__(self, console):
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "vectorizing",
            BarColumn(),
            MofNCompleteColumn(),
            "windows",
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not sys.stderr.isatty(),
        )
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("vectorize", total=total)
        self.bar.update(self.task, completed=done)
