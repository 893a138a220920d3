"""Output and logging conventions shared by every command.

Results go to stdout (a table, or one JSON document with ``--json``); logs, progress bars and
errors go to stderr. Only the CLI configures logging handlers.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence


def setup(quiet: bool = False, verbose: bool = False) -> None:
    from prtool.progress import set_quiet

    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s" if verbose else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("prtool").setLevel(level)
    set_quiet(quiet)
    import warnings

    if not verbose:  # exporters and open_clip are chatty; their warnings are not the user's business
        warnings.filterwarnings("ignore")
        logging.getLogger("root").setLevel(logging.ERROR)


def emit(result, as_json: bool, human: Callable[[object], None] | None = None) -> None:
    """Print ``result`` as JSON, or through ``human`` (tables) when given."""
    if as_json or human is None:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        human(result)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]], stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    Console(stderr=stderr, width=max(100, 0)).print(t)


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if v is None:
        return "-"
    return str(v)


def print_checks(checks: list[dict], title: str, stderr: bool = False) -> None:
    table(title, ["check", "ok", "detail"], [(c["check"], c["passed"], c["detail"]) for c in checks], stderr=stderr)
