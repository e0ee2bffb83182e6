"""``segability version``: the smallest command, also a smoke test of the installed script."""

from __future__ import annotations

import typer

from segability.cli.app import app


@app.command()
def version() -> None:
    """Print the package version."""
    from segability import __version__

    typer.echo(__version__)
