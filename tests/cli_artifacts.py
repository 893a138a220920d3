"""Small artifacts every CLI matrix case can point at, made once per session by prtool's own commands
on the tiny test model: a rankings store, a predictor, tokens, an export, a fake Fashion-MNIST."""

from __future__ import annotations

import contextlib
import gzip
import io
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TINY = ("-m", "prtool-tiny", "-p", "none")


def run(*args) -> tuple[int, str, str]:
    """``prtool ARGS`` in-process through the real entry point, outside capsys (session fixtures)."""
    from prtool.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["prtool", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def write_fake_idx(folder: Path, split: str, count: int = 20) -> Path:
    """A Fashion-MNIST split in IDX form (random items), enough for `prtool testbed data|train`."""
    from prtool.testbed import data as tbdata

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    img_name, lab_name = tbdata._IDX_FILES[split]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{img_name}.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">III", *images.shape)
                                                          + images.tobytes()))
    (folder / f"{lab_name}.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", count)
                                                          + labels.tobytes()))
    return folder


@dataclass
class Artifacts:
    root: Path
    rankings: Path
    predictor: Path
    tokens: Path
    onnx: Path
    idx: Path
    images: Path


def _ok(*args) -> str:
    code, out, err = run(*args)
    assert code == 0, f"prtool {' '.join(map(str, args))} failed: {err}"
    return out


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    root = tmp_path_factory.mktemp("cli-artifacts")
    a = Artifacts(root, root / "rk", root / "pred.safetensors", root / "tok.safetensors", root / "m.onnx",
                  root / "idx", root / "images")
    _ok("rank", *TINY, "-d", "testbed", "--split", "test", "--limit", "8", "--shard-size", "8", "--stride", "2",
        "-o", a.rankings, "-q")
    _ok("train", "-r", a.rankings, *TINY, "-d", "testbed", "--split", "test", "--epochs", "1", "-o", a.predictor,
        "--json")
    _ok("tune", *TINY, "-d", "testbed", "--shots", "1", "--epochs", "1", "-s", "1:16", "--predictor", a.predictor,
        "--eval-split", "", "-o", a.tokens, "-q")
    _ok("export", *TINY, "-s", "1:16", "--predictor", a.predictor, "--no-validate", "-o", a.onnx, "-q")
    write_fake_idx(a.idx, "test")
    write_fake_idx(a.idx, "train")
    from PIL import Image

    a.images.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), color).save(a.images / f"{i}.png")
    return a
