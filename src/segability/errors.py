"""Errors the library raises for what a user gave it (layer 0: imports nothing of segability)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["UsageError", "as_usage_error"]


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


@contextlib.contextmanager
def as_usage_error(argument: str) -> Iterator[None]:
    """Inside, a ``ValueError`` of a parser or reader becomes a :class:`UsageError` about ``argument``.

    Example:
        >>> try:
        ...     with as_usage_error("roi_size"):
        ...         int("a")
        ... except UsageError as err:
        ...     print(err.argument)
        roi_size
    """
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc), argument=argument) from exc
