"""The ``segability`` command. Heavy imports (torch, pandas) happen inside commands so ``--help`` is instant.

Each command module registers its commands on :data:`app` when imported; the imports at the bottom
list them.
"""

from __future__ import annotations

import traceback

import click
import typer
from typer import exceptions as _typer_exceptions
from typer.core import TyperGroup

# Exits and click's own errors (typer bundles its own copy of click) are not ours to translate.
_PASS_THROUGH = (
    SystemExit, _typer_exceptions.TyperException, _typer_exceptions.Exit, _typer_exceptions.Abort,
    click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort,
)  # fmt: skip

class _Commands(TyperGroup):
    """Turns what a command raises into a message and an exit code, in one place.

    A :class:`segability.errors.UsageError` (or an occupied output folder) is a usage error: its
    message with the flag, exit 2. Anything else is a failure: a one-line message, exit 1, and the
    traceback with ``segability --debug ...``. Exits and click's own errors pass through.
    """

    def invoke(self, ctx: click.Context):
        from segability.cli.console import literal, usage_message
        from segability.errors import UsageError

        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except (UsageError, FileExistsError) as err:
            message = usage_message(err) if isinstance(err, UsageError) else str(err)
            _console().print(f"[red]error:[/red] {literal(message)}", highlight=False)
            if ctx.meta.get("segability.debug"):
                _console().print(literal("".join(traceback.format_exception(err))), highlight=False)
            raise typer.Exit(2) from None
        except Exception as err:
            _console().print(f"[red]error:[/red] {literal(f'{type(err).__name__}: {err}')}", highlight=False)
            if ctx.meta.get("segability.debug"):
                _console().print(literal("".join(traceback.format_exception(err))), highlight=False)
            else:
                _console().print("(run with segability --debug ... for the traceback)", highlight=False)
            raise typer.Exit(1) from None


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


app = typer.Typer(
    cls=_Commands,
    name="segability",
    help="Segmentation ability maps: what every layer of a segmentation network can segment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain text: Rich markup would swallow "[ray]" in "pip install 'segability[ray]'"
    # and "[default: ...]", and would read brackets in user paths within usage errors as markup.
    rich_markup_mode=None,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error."),
) -> None:
    """segability: what every layer and unit of a segmentation network can segment."""
    ctx.meta["segability.debug"] = debug


def main() -> None:
    """Entry point of the console script."""
    import logging
    import warnings

    # MONAI's DICOM reader warns on every start that an optional GPU codec is missing.
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    app()


# Command modules (each registers its commands on `app`).
from segability.cli import (
    analyze,  # noqa: E402,F401
    core_commands,  # noqa: E402,F401
    demo_commands,  # noqa: E402,F401
    evaluate_qc,  # noqa: E402,F401
    prune,  # noqa: E402,F401
    qc,  # noqa: E402,F401
    report,  # noqa: E402,F401
    review,  # noqa: E402,F401
)

if __name__ == "__main__":  # `python -m segability.cli.app`: run the module the commands registered on
    from segability.cli.app import main as _main

    _main()
