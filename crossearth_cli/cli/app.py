"""The Typer application object that every command module registers on.

Kept free of heavy imports (torch, rasterio, shapely): ``crossearth --help`` must be instant.
"""

from __future__ import annotations

import typer

from crossearth_cli import __version__

app = typer.Typer(
    name="crossearth",
    help="Run the CrossEarth remote-sensing foundation model over GeoTIFFs of any size.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"crossearth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks for errors (for bug reports)."
    ),
) -> None:
    """CrossEarth on GeoTIFFs: segment, vectorize, manage checkpoints."""
