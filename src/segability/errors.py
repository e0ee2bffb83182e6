"""Errors the library raises for what a user gave it (layer 0: imports nothing of segability)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A bad argument or input, named by its Python argument.

    The command line maps ``argument`` to its flag and exits with code 2; anything else that goes
    wrong is a failure (exit 1), never dressed as a usage error.

    Args:
        message: what was expected and what was given; it starts with the argument's name.
        argument: the Python argument (``"target"``, ``"images"``, ...).

    Example:
        >>> err = UsageError("target must be a class index >= 0, got -1", argument="target")
        >>> err.argument, str(err)
        ('target', 'target must be a class index >= 0, got -1')
    """

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument
