"""Progress bars for the shells (CLI, demo): the library takes a callback, these make one.

``with progress_bar(True, total, "analysing") as advance: ...`` gives ``advance(n)``, the callback
that :func:`segability.analyze` and the other long calls take as ``progress``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["progress_bar"]


class progress_bar:
    """A rich progress bar whose ``advance(n)`` moves it by ``n``; with ``enabled=False``, nothing.

    Args:
        enabled: show the bar.
        total: the number of steps, or None when unknown.
        label: the text in front of the bar (printed literally, never as markup).
        failures: also show a "N failed" counter; ``advance(n, failed=k)`` adds to it.
    """

    def __init__(self, enabled: bool, total: int | None, label: str = "analysing", *, done: int = 0, failures: bool = False):
        self.enabled = enabled
        self.total = total
        self.label = label
        self.done = done
        self.failures = failures
        self.failed = 0
        self._bar: Any = None

    def __enter__(self) -> Callable[..., None]:
        if not self.enabled:
            return lambda n=1, failed=0: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn(self.label.replace("{", "{{").replace("}", "}}"), markup=False), BarColumn(), MofNCompleteColumn()]
        if self.failures:
            columns.append(TextColumn("{task.fields[failed]} failed"))
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = Progress(*columns)
        self._bar.__enter__()
        task = self._bar.add_task("run", total=self.total, completed=self.done, failed=0)

        def advance(n: int = 1, failed: int = 0) -> None:
            self.failed += int(failed)
            self._bar.update(task, advance=n, failed=self.failed)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
