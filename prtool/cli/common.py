"""Output and logging conventions shared by every command.

Results go to stdout (a table, or one JSON document with ``--json``); logs, progress bars and
errors go to stderr. Only the CLI configures logging handlers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence


def setup(quiet: bool = False, verbose: bool = False) -> None:
    from prtool.util.progress import set_quiet

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
    Console(stderr=stderr, width=100).print(t)


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


def check_output(path, kind: str = "file", option: str = "--out", suffixes: Sequence[str] = ()) -> None:
    """Refuse an output path that cannot be written, before any work starts (nothing is created).

    ``kind`` is ``file`` or ``dir``. Missing parent folders are fine (they are created when the
    result is written); a file where a folder must go, or a folder that is not writable, is not.
    """
    import os
    from pathlib import Path

    from prtool.errors import PrtoolError

    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise PrtoolError(f"{option} {path} must end in {' or '.join(suffixes)}")
    if kind == "file" and path.is_dir():
        raise PrtoolError(f"{option} {path} is a directory: pass a file path")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise PrtoolError(f"{option} {path} is a file: pass a folder")
    parent = path if kind == "dir" else path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PrtoolError(f"cannot create output directory {parent}: {ancestor} is a file; pass a writable {option}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PrtoolError(f"output directory {ancestor} is not writable: pass a writable {option}")


def dataset_note(*datasets) -> dict:
    """``{"dataset_notes": [...]}`` for a result when a dataset has something to say (e.g. no splits)."""
    notes = [n for d in datasets if d is not None for n in getattr(d, "notes", [])]
    return {"dataset_notes": sorted(set(notes))} if notes else {}


def check_schedule_syntax(schedule: str | None) -> None:
    """Refuse a malformed ``--schedule`` before any model loads (block ranges are checked against the
    model once it is loaded)."""
    from prtool.encoder.schedule import parse_schedule

    if schedule is not None:
        parse_schedule(schedule, num_patches=1 << 30, depth=1 << 30)


def check_inputs(predictor=None, tokens=None, onnx=None) -> None:
    """Read the small input files first, so the wrong kind of file is refused before a model loads."""
    if predictor is not None:
        from prtool.encoder.predictor import load_predictor

        load_predictor(predictor)
    if tokens is not None:
        from prtool.tuning.prompts import read_tokens

        read_tokens(tokens, None)
    if onnx is not None:
        from prtool.export.onnx_graph import load_onnx

        load_onnx(onnx)


@contextlib.contextmanager
def failed_validation_shown(as_json: bool):
    """Let a :class:`~prtool.errors.ValidationError` through after showing what failed, the same way for every
    command (export, export-text, validate): its result document on stdout with ``--json``, else the checks as a
    table on stderr. ``prtool.cli.app.main`` then prints the error's one line and exits 2."""
    from prtool.errors import ValidationError

    try:
        yield
    except ValidationError as exc:
        if as_json and exc.result is not None:
            emit(exc.result, True)
        elif exc.report is not None:
            print_checks(exc.report.checks, f"validation (failed) on {exc.report.images}", stderr=True)
        raise
