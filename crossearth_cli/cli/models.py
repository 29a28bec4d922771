"""`crossearth models`: the released checkpoints, as a table."""

from __future__ import annotations

import typer

from crossearth_cli.cli.app import app


@app.command("models")
def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """List the released CrossEarth checkpoints (use a name with --model)."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from crossearth_cli.presets import HF_REPO, PRESETS

    if as_json:
        rows = [
            {
                "name": p.name,
                "file": p.file,
                "hf_repo": HF_REPO,
                "hf_path": p.repo_path,
                "classes": list(p.classes),
                "palette": [list(c) for c in p.palette],
                "bands": p.bands,
                "crop_size": p.crop_size,
                "stride": p.stride,
                "gsd_m": p.gsd_m,
                "backbone": p.backbone,
                "trained_on": p.trained_on,
                "label_note": p.label_note or None,
            }
            for p in PRESETS
        ]
        typer.echo(json.dumps(rows, indent=2))
        return

    table = Table(title=f"CrossEarth checkpoints (huggingface.co/{HF_REPO})", title_justify="left")
    table.add_column("name / file", no_wrap=True)
    table.add_column("classes", ratio=1)
    table.add_column("bands", no_wrap=True)
    table.add_column("crop/\nstride", no_wrap=True)
    table.add_column("GSD\n(m)", no_wrap=True, justify="right")
    doubt = False
    for p in PRESETS:
        mark = " †" if p.label_note else ""
        doubt = doubt or bool(p.label_note)
        table.add_row(
            f"[bold]{p.name}[/bold]\n[dim]{escape(p.file)}[/dim]",
            escape(", ".join(p.classes) + mark),
            p.bands,
            f"{p.crop_size}/{p.stride}",
            "?" if p.gsd_m is None else f"{p.gsd_m:g}",
        )
    console = Console()
    console.print(table)
    console.print(
        "Split checkpoints also need the backbone: dinov2_converted.pth (512 models) or "
        "dinov2_converted_1024x1024.pth (1024 models)."
    )
    if doubt:
        console.print(
            "† class order as written in CrossEarth's code; index 1 is probably the object "
            "(unconfirmed) - check one prediction."
        )
