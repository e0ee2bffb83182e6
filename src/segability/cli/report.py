"""``segability report RESULT_DIR``: the HTML report of a result folder.

Exit codes: 0 written; 2 a usage error, or a result folder whose run has not merged its tables
(:class:`segability.report.IncompleteRunError`: resume the run first); 1 any other error in building
the report, said in one line (the traceback with ``--debug``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segability.cli.app import app


@app.command()
def report(
    ctx: typer.Context,
    result_dir: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            dir_okay=True,
            help="Result folder (layers.parquet, images.parquet, ...).",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            dir_okay=False,
            help="HTML file to write (default: RESULT_DIR/report.html). An earlier report is replaced; any other file is not.",
        ),
    ] = None,
    images: Annotated[
        list[str] | None,
        typer.Option(
            "--images",
            help="Id of a kept image whose maps to show; repeat for several (default: the first --max-images).",
        ),
    ] = None,
    max_images: Annotated[
        int,
        typer.Option("--max-images", min=1, help="How many kept images to show without --images."),
    ] = 4,
    slice_index: Annotated[
        int | None,
        typer.Option(
            "--slice",
            min=0,
            help="Slice along the last axis for 3D images (default: largest target area).",
        ),
    ] = None,
    title: Annotated[
        str | None, typer.Option("--title", help="Page title (default: from the model name).")
    ] = None,
    findings: Annotated[
        Path | None,
        typer.Option(
            "--findings",
            exists=True,
            dir_okay=False,
            help="JSON list of statements for 'What this run shows' (default: RESULT_DIR/findings.json).",
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Print the traceback of an error (as segability --debug does)."),
    ] = False,
) -> None:
    """Write a self-contained HTML report of a result folder.

    Exit codes, as for analyze: 0 the report of a run where every file was analysed; 1 the run
    had failed files (the report lists them) or the report failed; 2 a usage error (an
    unfinished run: resume it first).
    """
    import json
    import traceback

    from rich.console import Console

    from segability.cli.console import EXIT_USAGE, fail, literal, printable
    from segability.report import IncompleteRunError, build_report

    console = Console(stderr=True, soft_wrap=True)  # a message stays on one line
    try:
        statements = None
        if findings is not None:
            try:
                statements = json.loads(findings.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"--findings {findings} is not valid JSON: {err}") from err
            if isinstance(statements, dict) and "findings" in statements:
                statements = statements["findings"]
            if not isinstance(statements, list):
                raise ValueError(f"--findings {findings} must hold a JSON list of strings")
        with console.status("Building the report…"):
            path = build_report(
                result_dir,
                out,
                images=images or None,
                max_images=max_images,
                slice_index=slice_index,
                title=title,
                findings=statements,
            )
    except IncompleteRunError as err:
        fail(console, err, EXIT_USAGE)
    except Exception as err:
        if debug or ctx.meta.get("segability.debug"):
            console.print(literal("".join(traceback.format_exception(err))), highlight=False)
        known = isinstance(err, (ValueError, FileNotFoundError, FileExistsError))
        fail(console, err if known else f"{type(err).__name__}: {err}", 1)
    size = path.stat().st_size / 1e6
    typer.echo(f"Wrote {printable(path)} ({size:.1f} MB)")
    failed = _failed_files(result_dir)
    if failed:  # the exit codes of analyze: the run is reported, but some of its files were not analysed
        console.print(f"[yellow]note:[/yellow] {failed} file(s) of this run failed; the report lists them", highlight=False)
        raise typer.Exit(1)


def _failed_files(result_dir: Path) -> int:
    """How many files the run could not analyse (rows of its errors.csv; 0 without one)."""
    from segability.analysis.results import ERRORS, read_table

    path = result_dir / ERRORS.file
    return len(read_table(path, ERRORS)) if path.is_file() else 0
