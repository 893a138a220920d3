"""Progress bars on stderr (rich), off when stderr is not a terminal or with --quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, info: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=info or "")


@contextmanager
def progress_bar(total: int, description: str, quiet: bool = False, completed: int = 0):
    """Yield an object with ``update(advance, info)``; draws only on an interactive stderr."""
    if quiet or _QUIET or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)
