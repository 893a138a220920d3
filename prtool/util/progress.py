"""Progress on stderr: a rich bar on a terminal; without one, a log line at a steady pace (off with --quiet).

The log lines (``rank: 120/1000 images (12%), 1.03 images/s, ETA 14m13s``) come at most every
``PRTOOL_PROGRESS_SECONDS`` (30 by default), so a job under nohup, a scheduler or CI shows it is alive.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def log_interval() -> float:
    try:
        return float(os.environ.get("PRTOOL_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, info: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=info or "")


class _LogLines:
    """``update`` like a bar; logs ``done/total unit (pct), rate, ETA`` when the interval has passed."""

    def __init__(self, total: int, description: str, unit: str, completed: int = 0):
        self.total, self.description, self.unit = total, description, unit
        self.done, self.start_done = completed, completed
        self.t0 = self.last = time.monotonic()
        self.interval, self.lines, self.logged_done = log_interval(), 0, None

    def update(self, advance: int = 1, info: str | None = None) -> None:
        self.done += advance
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.emit(now)

    def emit(self, now: float) -> None:
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "unknown"
        pct = 100 * self.done / self.total if self.total else 100.0
        self.lines, self.logged_done = self.lines + 1, self.done
        log.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, ETA %s", self.description, self.done, self.total, self.unit, pct,
                 rate, self.unit, eta if left > 0 else "done")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextmanager
def progress_bar(total: int, description: str, quiet: bool = False, completed: int = 0, unit: str = "steps"):
    """Yield an object with ``update(advance, info)``: a bar on an interactive stderr, else log lines."""
    if quiet or _QUIET:
        yield _Bar(None, None)
        return
    if not sys.stderr.isatty():
        lines = _LogLines(total, description, unit, completed)
        yield lines
        if lines.lines and lines.logged_done != lines.done:  # a job that reported progress also reports its end
            lines.emit(time.monotonic())
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)
