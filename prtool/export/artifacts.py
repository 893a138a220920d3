"""Writing artifacts: refuse an unwritable output before any work, and publish files atomically.

Nothing appears at an output path unless everything written with it succeeded: the files are
written in a temporary folder beside the target and renamed into place together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prtool.errors import PrtoolError


def check_output_dir(out: Path, suffix: str = ".onnx") -> None:
    """Create ``out``'s folder if needed; refuse one that cannot be written, or a name without ``suffix``."""
    parent = Path(out).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrtoolError(f"cannot create output directory {parent} ({exc.strerror}): pass a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise PrtoolError(f"output directory {parent} is not writable: pass a writable --out")
    if Path(out).suffix != suffix:
        raise PrtoolError(f"output {out} must end in {suffix}")


@contextlib.contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``; on a clean exit every file in it is moved next to ``out``.

    On an exception nothing is moved and the folder is removed, so no half-written artifact is left.
    """
    out = Path(out)
    tmpdir = Path(tempfile.mkdtemp(prefix=".prtool-export-", dir=out.parent))
    try:
        yield tmpdir
        for f in tmpdir.iterdir():
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
