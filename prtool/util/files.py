"""File helpers every layer uses: content hashes, atomic JSON writes, the mode of files written through
temporary files. Imports nothing of prtool, so the encoder core, the rankings store and the exporters share
them without importing each other."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def follow_umask(path: Path) -> None:
    """Give a file written through a temporary file (mkstemp and safetensors create 0600) the mode
    an ordinary ``open()`` would: 0666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        follow_umask(Path(tmp))  # mkstemp creates 0600; manifests are meant to be read by consumers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
