"""The ``segability`` command. Heavy imports (torch, pandas) happen inside commands so ``--help`` is instant.

Each command module registers its commands on :data:`app` when imported; the imports at the bottom
list them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
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
def _root() -> None:
    """segability: what every layer and unit of a segmentation network can segment."""


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
    prune,  # noqa: E402,F401
    qc,  # noqa: E402,F401
    report,  # noqa: E402,F401
)

if __name__ == "__main__":  # `python -m segability.cli.app`: run the module the commands registered on
    from segability.cli.app import main as _main

    _main()
