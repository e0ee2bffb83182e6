"""Printing text the user controls (file and folder names, layer names, error messages) safely.

Rich reads ``[...]`` in printed strings as markup: a file named ``[/b].npy`` raises ``MarkupError``
and ``[red]broken.npy`` is shown as ``broken.npy``. A name can also hold control characters (an
escape sequence recolours or clears the terminal, a carriage return overwrites the line). Every
command prints such text through :func:`literal` (Rich) or :func:`printable` (plain echo).
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

import typer

__all__ = ["EXIT_USAGE", "fail", "literal", "printable"]

EXIT_USAGE = 2

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


def fail(console: Any, message: Any, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` (shown literally) on ``console`` and exit with ``code``."""
    console.print(f"[red]error:[/red] {literal(message)}", highlight=False)
    raise typer.Exit(code)
