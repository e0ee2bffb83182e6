"""Printing text the user controls (file and folder names, layer names, error messages) safely.

Rich reads ``[...]`` in printed strings as markup: a file named ``[/b].npy`` raises ``MarkupError``
and ``[red]broken.npy`` is shown as ``broken.npy``. A name can also hold control characters (an
escape sequence recolours or clears the terminal, a carriage return overwrites the line). Every
command prints such text through :func:`literal` (Rich) or :func:`printable` (plain echo).
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

__all__ = ["EXIT_USAGE", "EXIT_FAILED", "exit_with", "fail", "flag", "literal", "printable", "usage_message"]

EXIT_USAGE = 2
EXIT_FAILED = 1

# C0 controls (newline, tab and carriage return included: each moves the cursor), DEL, C1 controls,
# the Unicode line and paragraph separators, and the bidirectional overrides that reorder a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any) -> str:
    r"""``text`` as a string with every control character written as a visible escape.

    Example:
        >>> printable("scan\x1b[31m\n.npy")
        'scan\\x1b[31m\\x0a.npy'
    """
    return _CONTROL.sub(_visible, str(text))


def literal(text: Any) -> str:
    r"""``text`` for Rich: shown as it is (markup escaped), with control characters made visible.

    Put no markup tag right after it: a final backslash of ``text`` would escape that tag.

    Example:
        >>> from rich.console import Console
        >>> Console(width=80).print(literal("[red]broken.npy [/b] \x1b[2J"))
        [red]broken.npy [/b] \x1b[2J
    """
    from rich.markup import escape

    shown = printable(text)
    escaped = escape(shown)
    # escape() doubles a final backslash lest it escape a tag that follows; printed alone or before
    # plain text it would then show twice. Callers put no markup right after the result.
    if shown.endswith("\\") and not shown.endswith("\\\\"):
        escaped = escaped[:-1]
    return escaped


# Python arguments whose flag is not ``--`` + the name with dashes.
_FLAGS = {"model_args": "--model-arg", "report": "--no-report", "progress": "--no-progress"}
# The arguments a library message may name besides its own (as ``name=value``): the analyze command's.
_ARGUMENTS = (
    "model", "weights", "model_args", "trust_pickle", "images", "labels", "label_suffix", "out", "layers", "units",
    "guide", "output", "target", "mask", "output_key", "preprocess", "roi_size", "overlap", "sw_batch_size",
    "keep_maps", "engine", "ray_address", "workers", "gpus_per_worker", "device", "resume", "force", "report",
    "progress", "empty", "example_shape",
)  # fmt: skip


def flag(argument: str) -> str:
    """The command-line flag of a Python argument: ``label_suffix`` -> ``--label-suffix``.

    Example:
        >>> flag("label_suffix"), flag("model_args")
        ('--label-suffix', '--model-arg')
    """
    if argument.startswith("-"):  # already a flag
        return argument
    return _FLAGS.get(argument, "--" + argument.replace("_", "-"))


def usage_message(err: BaseException, argument: str | None = None) -> str:
    """A library error's message in the words of the command line.

    The library names Python arguments (:class:`segability.errors.UsageError` carries the one it is
    about); here the leading argument name becomes its flag (``target must be ...`` -> ``--target
    must be ...``), and so does every ``name=True`` (``--name``) and ``name=value`` (``--name value``)
    of a known argument in the text.

    Args:
        err: the error.
        argument: the argument when ``err`` carries none (a ``FileExistsError`` about ``out``).

    Example:
        >>> from segability.errors import UsageError
        >>> usage_message(UsageError("resume: the run differs; give force=True to start over", argument="resume"))
        '--resume: the run differs; give --force to start over'
    """
    text = str(err)
    argument = getattr(err, "argument", None) or argument
    if argument and re.match(rf"{re.escape(argument)}\b(?![=.(\[])", text):
        text = flag(argument) + text[len(argument) :]
    names = "|".join(_ARGUMENTS)
    text = re.sub(rf"(?<![\w.-])({names})=True\b", lambda m: flag(m.group(1)), text)
    return re.sub(rf"(?<![\w.-])({names})=(?=\S)", lambda m: flag(m.group(1)) + " ", text)


def fail(console: Any, message: Any, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` (shown literally) on ``console`` and exit with ``code``."""
    console.print(f"[red]error:[/red] {literal(message)}", highlight=False)
    exit_with(code)


def exit_with(code: int) -> NoReturn:
    """End the command with ``code``.

    ``SystemExit``, not ``typer.Exit``: typer's ``Exit`` is an ``Exception`` (a ``RuntimeError``),
    which the app's error handler would take for a failure of the command.
    """
    raise SystemExit(code)
