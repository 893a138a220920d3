"""Benchmark reports: one result written as JSON, markdown and (optionally) a plot, each file atomically.

``prtool bench ...`` and ``benchmarks/run_suite.py`` both write through :func:`write_report`, so a
report folder never holds a half-written file and both name their files the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from prtool.util.files import follow_umask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path`` (same suffix: a plot's format follows it), then
    rename it into place; nothing is left at ``path`` or beside it if ``write`` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(folder: Path, stem: str, result: dict, markdown: str,
                 plot: Callable[[dict, Path], None] | None = None, plot_name: str | None = None) -> dict[str, Path]:
    """Write ``folder/stem.json`` (``result``), ``folder/stem.md`` (``markdown``) and, with ``plot``,
    ``folder/plot_name`` (default ``stem.png``) drawn by ``plot(result, path)``; returns the paths by kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md"}
    text = json.dumps(result, indent=2, default=str) + "\n"  # as write_json_atomic writes it
    write_atomic(paths["json"], lambda p: p.write_text(text))
    write_atomic(paths["markdown"], lambda p: p.write_text(markdown))
    if plot is not None:
        paths["plot"] = folder / (plot_name or f"{stem}.png")
        write_atomic(paths["plot"], lambda p: plot(result, p))
    return paths
