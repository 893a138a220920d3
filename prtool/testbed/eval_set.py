"""The shipped splits: 2,000 Fashion-MNIST test items (``test``, the eval split), 3,000 train items
(``train``) and 3,000 other test items (``val``: held out from the model's training, the predictor's
rankings and the eval split, for calibration such as ``prtool plan``'s), class-balanced and seeded, in
compact form.

The repository ships the 28x28 source items (about 1.5 MB raw, compressed), not the canvases; the
canvases are rendered from them deterministically (``EVAL_SEED``) and checked against the
SHA-256 recorded when the pack was built, so the demo and tests need nothing installed and
every machine scores the same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from prtool.errors import PrtoolError
from prtool.testbed import data as tbdata
from prtool.testbed import spec

# split -> (pack file, Fashion-MNIST split, seed, items per class, the pack whose items it leaves out)
PACKS = {
    "test": (spec.EVAL_ITEMS_PATH, "test", tbdata.EVAL_SEED, tbdata.EVAL_PER_CLASS, None),
    "train": (spec.TRAIN_ITEMS_PATH, "train", tbdata.EVAL_SEED + 1, 300, None),
    "val": (spec.VAL_ITEMS_PATH, "test", tbdata.EVAL_SEED + 2, 300, "test"),
}


def pack_indices(split: str, labels: np.ndarray) -> np.ndarray:
    """The Fashion-MNIST indices of a pack's items, chosen from ``labels`` of its source split."""
    _, _, seed, per_class, excluded = PACKS[split]
    exclude = pack_indices(excluded, labels) if excluded else None
    return tbdata.select_eval_indices(labels, per_class=per_class, seed=seed, exclude=exclude)


def build_pack(split: str, idx_dir: Path = tbdata.DEFAULT_IDX_DIR, out: Path | None = None) -> dict:
    """Select a split's shipped items from the Debian IDX files and write the pack atomically."""
    default_out, source, seed, _, _ = PACKS[split]
    images, labels = tbdata.load_fashion_mnist(source, idx_dir)
    indices = pack_indices(split, labels)
    items, item_labels = images[indices], labels[indices]
    shas = {_sha_key(d): tbdata.canvases_sha256(tbdata.render_canvases(items, seed=seed, style=style))
            for d, style in tbdata.DOMAINS.items()}
    out = Path(out or default_out)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, items=items, labels=item_labels, source_indices=indices.astype(np.int32),
                        seed=np.int64(seed), **{k: np.array(v) for k, v in shas.items()})
    tmp.replace(out)
    return {"path": str(out), "count": int(len(items)), **shas}


def _sha_key(domain: str) -> str:
    """The pack field recording a domain's canvases: ``canvases_sha256``, ``sketch_canvases_sha256``."""
    return f"{domain}_canvases_sha256" if domain else "canvases_sha256"


@functools.lru_cache(maxsize=2)
def _pack(path: str):
    p = Path(path)
    if not p.exists():
        raise PrtoolError(f"testbed pack {p} is missing: run `prtool testbed data --build-packs`")
    with np.load(p) as z:
        shas = {d: str(z[_sha_key(d)]) if _sha_key(d) in z else None for d in tbdata.DOMAINS}
        return z["items"], z["labels"].astype(np.int64), int(z["seed"]), shas


@functools.lru_cache(maxsize=4)
def _render(path: str, limit: int | None, domain: str = ""):
    items, labels, seed, shas = _pack(path)
    sha = shas[domain]
    if sha is None:
        raise PrtoolError(f"testbed pack {path} has no {domain} record: run `prtool testbed data --build-packs`")
    n = len(items) if limit is None else min(limit, len(items))
    canvases = tbdata.render_canvases(items, seed=seed, indices=range(n), style=tbdata.DOMAINS[domain])
    if limit is None or n == len(items):
        got = tbdata.canvases_sha256(canvases)
        if got != sha:
            raise PrtoolError(
                f"rendered testbed eval canvases differ from the pack's record ({got[:12]} != {sha[:12]}): "
                "numpy/Pillow produced different pixels; regenerate the packs with `prtool testbed data --build-packs`"
            )
    canvases.setflags(write=False)
    return canvases, labels[:n]


def load_split_canvases(split: str, limit: int | None = None, domain: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(canvases [M, 112, 112, 3] uint8, labels [M] int64)`` of a shipped split (train or test).

    ``domain="sketch"`` renders the same items as line drawings (``tbdata.SKETCH``).
    """
    if split not in PACKS:
        raise PrtoolError(f"the testbed ships the splits {', '.join(PACKS)}, not {split!r}")
    if domain not in tbdata.DOMAINS:
        raise PrtoolError(f"unknown testbed domain {domain!r}: use testbed or testbed-sketch")
    return _render(str(PACKS[split][0]), limit, domain)


def load_eval_canvases(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shipped eval (test) split."""
    return load_split_canvases("test", limit)
