"""``segability review RUN_DIR`` (the review web app, or ``--export`` of its decisions) and
``segability select RUN_DIR --budget N --out worklist.csv`` (the images to label next).

``review`` serves the run folder on http://127.0.0.1:8765 until stopped (Ctrl-C); decisions go to
``RUN_DIR/review.sqlite`` and nothing else in the folder is written. Another ``--host`` is used
only when given, with a warning: anyone who can reach it can read the images and decide.

Exit codes: 0 done; 2 a usage error (a missing run folder, an output file that exists without
``--force``, a web server that is not installed); 1 anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segability.cli.app import app
from segability.errors import UsageError

RUN_HELP = "A run folder written by `segability analyze` (and `segability qc`)."


def _run_folder(run_dir: Path) -> Path:
    for required in ("layers.parquet", "images.parquet"):
        if not (run_dir / required).is_file():
            raise UsageError(f"run_dir {run_dir} is not a segability run folder: {required} is missing", argument="run_dir")
    return run_dir


def _refuse_existing(path: Path, force: bool, argument: str) -> None:
    if path.exists() and not force:
        raise UsageError(f"{argument} {path} exists; pass --force to replace it", argument=argument)


@app.command()
def review(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, dir_okay=True, help=RUN_HELP)],
    port: Annotated[int, typer.Option("--port", help="Port to serve on (0: any free port).")] = 8765,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to bind. Anything but a loopback address exposes the run to the network."),
    ] = "127.0.0.1",
    export: Annotated[
        Path | None,
        typer.Option("--export", dir_okay=False, help="Write every decision to this CSV file and exit (no server)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="With --export: replace an existing file.")] = False,
) -> None:
    """Review a run's cases in the browser, least trusted first; decisions go to RUN_DIR/review.sqlite."""
    from rich.console import Console

    from segability.cli.console import literal, printable

    _run_folder(run_dir)
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be in [0, 65535], got {port}", argument="port")
    if export is not None:
        from segability.review.store import export_decisions

        _refuse_existing(export, force, "export")
        if not (run_dir / "review.sqlite").is_file():
            raise UsageError(f"run_dir {run_dir} holds no review.sqlite: nothing was reviewed there", argument="run_dir")
        path = export_decisions(run_dir, export, force=True)
        typer.echo(f"Wrote {printable(path)}")
        return
    try:
        import uvicorn

        from segability.review.app import create_app, is_loopback
    except ImportError as err:
        raise UsageError(f"the review app needs its web server: pip install 'segability[review]' ({err})") from err
    console = Console(stderr=True, soft_wrap=True)
    if not is_loopback(host):
        console.print(
            f"[yellow]warning:[/yellow] serving on {literal(host)}, not 127.0.0.1: anyone who can reach this "
            "address can see the images and record decisions.",
            highlight=False,
        )
    application = create_app(run_dir, host=host)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"Reviewing {literal(run_dir)} on http://{literal(shown)}:{port}/ (Ctrl-C to stop)", highlight=False)
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command()
def select(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, dir_okay=True, help=RUN_HELP)],
    budget: Annotated[int, typer.Option("--budget", help="How many images to choose.")],
    out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="The worklist to write (CSV).")],
    copy_to: Annotated[
        Path | None,
        typer.Option("--copy-to", file_okay=False, help="Copy the chosen image files here (never overwriting)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Choose the images whose labels would help most: least trusted first, spread over the SA profiles."""
    from segability.analysis.results import write_atomic
    from segability.cli.console import printable
    from segability.review.select import copy_chosen, select_for_labelling

    _run_folder(run_dir)
    _refuse_existing(out, force, "out")
    chosen = select_for_labelling(run_dir, budget)
    if copy_to is not None:
        if "file" not in chosen.columns:
            raise UsageError("copy_to: this run has no file column (only batch runs over files do)", argument="copy_to")
        copy_chosen([str(f) for f in chosen["file"]], copy_to)
    write_atomic(out, chosen.to_csv(index=False).encode("utf-8"))
    typer.echo(f"Chose {len(chosen)} of budget {budget}; wrote {printable(out)}")
    if copy_to is not None:
        typer.echo(f"Copied {len(chosen)} files to {printable(copy_to)}")
