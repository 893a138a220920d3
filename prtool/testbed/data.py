"""Cluttered Fashion-MNIST: the testbed's images, generated deterministically.

Each canvas is ``[112, 112, 3]`` uint8: a smooth, textured, per-canvas different background, 3-6
small crops of other items as clutter, and the labelled item scaled x1.5-2 at a random position.
Clutter is pasted with a soft alpha taken from its own intensity, so it stays faint; the labelled
item is opaque over its whole silhouette, dark garments included, as an object in a photo is (v2
used the soft alpha for the item too, and dark garments faded into the background: 54-59% top-1
on items of mean intensity under 100, 71% on those over 140). The item keeps its own intensities
whatever the background, brighter than its surroundings on a dark canvas and darker on a bright
one, so "keep the brightest patches" is not a ranking that finds the object, and no two
background patches are identical.

``SKETCH`` renders the same items as line drawings (their gradient magnitude): a downstream domain
the testbed CLIP never sees in training, as ImageNet-Sketch is for CLIP, where few-shot tuning
(``prtool tune``) has something to win back. The in-domain canvases leave it nothing: the testbed
was trained on exactly their classes and captions.

Canvas ``i`` of a split depends only on ``(seed, i)`` and the source items, never on the order in
which canvases are made: ``render_canvases(items, labels, seed, range(a, b))`` gives the same bytes
as slicing a full run.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from prtool.errors import PrtoolError

DEFAULT_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CANVAS = 112
ITEM = 28
EVAL_SEED = 20250101
EVAL_PER_CLASS = 200  # 2,000 shipped eval canvases

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class CanvasStyle:
    """Knobs of the canvas generator (the defaults are the testbed definition)."""

    clutter_min: int = 3  # testbed v1 used 6-10; v2 lightened it (README, "The testbed")
    clutter_max: int = 6
    clutter_size: int = 8
    scale_min: float = 1.5  # v4 draws the item x1.5-2 (v2: x1-2)
    scale_max: float = 2.0
    alpha_ramp: float = 48.0  # clutter intensity at which its paste becomes opaque
    item_ramp: float = 12.0  # the same for the labelled item: opaque over its whole silhouette (v2: 48)
    fine_noise: float = 5.0  # per-pixel noise (std, grey levels)
    sketch: bool = False  # draw items and clutter as outlines: the `testbed-sketch` downstream domain


SKETCH = CanvasStyle(sketch=True)
DOMAINS = {"": CanvasStyle(), "sketch": SKETCH}  # rendering domain -> style; "" is the testbed itself


def _open_idx(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            data = candidate.read_bytes()
            return gzip.decompress(data) if candidate.suffix == ".gz" else data
    raise PrtoolError(
        f"Fashion-MNIST file {path.name}[.gz] not found in {path.parent}: "
        "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --idx-dir"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    data = _open_idx(Path(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PrtoolError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PrtoolError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def load_fashion_mnist(split: str, idx_dir: Path = DEFAULT_IDX_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images [M, 28, 28] uint8, labels [M] uint8)`` of the train or test split."""
    if split not in _IDX_FILES:
        raise PrtoolError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    img_name, lab_name = _IDX_FILES[split]
    images = read_idx(Path(idx_dir) / img_name)
    labels = read_idx(Path(idx_dir) / lab_name)
    if images.shape[0] != labels.shape[0]:
        raise PrtoolError(f"{idx_dir}: {split} images and labels differ in count")
    return images, labels


def select_eval_indices(labels: np.ndarray, per_class: int = EVAL_PER_CLASS, seed: int = EVAL_SEED,
                        exclude: np.ndarray | None = None) -> np.ndarray:
    """Class-balanced, seeded subset of a split (sorted indices), none of them in ``exclude``."""
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), bool)
    if exclude is not None:
        allowed[exclude] = False
    chosen = [rng.choice(np.flatnonzero((labels == c) & allowed), size=per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(chosen))


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)


def _outline(gray: np.ndarray) -> np.ndarray:
    """An item as a line drawing: its gradient magnitude, rescaled so the strongest edge is 255."""
    gy, gx = np.gradient(gray.astype(np.float32))
    mag = np.hypot(gx, gy)
    return mag * (255.0 / max(float(mag.max()), 1e-6))


def _background(rng: np.random.Generator, style: CanvasStyle) -> np.ndarray:
    grid = int(rng.integers(3, 8))
    low = rng.random((grid, grid), dtype=np.float32)
    smooth = np.asarray(
        Image.fromarray(low, mode="F").resize((CANVAS, CANVAS), Image.BICUBIC), dtype=np.float32
    )
    smooth = (smooth - smooth.min()) / max(float(smooth.max() - smooth.min()), 1e-6)
    lo = rng.uniform(0.0, 110.0)
    hi = min(lo + rng.uniform(50.0, 150.0), 235.0)
    base = lo + smooth * (hi - lo)
    tint = 1.0 + rng.uniform(-0.12, 0.12, size=3).astype(np.float32)
    bg = base[..., None] * tint[None, None, :]
    return bg + rng.normal(0.0, style.fine_noise, size=bg.shape).astype(np.float32)


def _paste(canvas: np.ndarray, patch: np.ndarray, y: int, x: int, ramp: float) -> None:
    h, w = patch.shape
    alpha = np.clip(patch / ramp, 0.0, 1.0)[..., None]
    region = canvas[y : y + h, x : x + w]
    canvas[y : y + h, x : x + w] = region * (1.0 - alpha) + patch[..., None] * alpha


def render_canvas(
    rng: np.random.Generator, item: np.ndarray, clutter_pool: np.ndarray, style: CanvasStyle
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One canvas and the item's box ``(y, x, size)``."""
    canvas = _background(rng, style)
    cs = style.clutter_size
    for _ in range(int(rng.integers(style.clutter_min, style.clutter_max + 1))):
        src = clutter_pool[int(rng.integers(0, len(clutter_pool)))].astype(np.float32)
        src = _outline(src) if style.sketch else src
        oy, ox = (int(v) for v in rng.integers(6, ITEM - 6 - cs + 1, size=2))
        y, x = (int(v) for v in rng.integers(0, CANVAS - cs + 1, size=2))
        _paste(canvas, src[oy : oy + cs, ox : ox + cs], y, x, style.alpha_ramp)
    size = int(round(ITEM * rng.uniform(style.scale_min, style.scale_max)))
    y, x = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
    drawn = _resize(item, size)
    _paste(canvas, _outline(drawn) if style.sketch else drawn, y, x, style.item_ramp)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), (y, x, size)


def render_canvases(
    items: np.ndarray,
    seed: int,
    indices=None,
    clutter_pool: np.ndarray | None = None,
    style: CanvasStyle = CanvasStyle(),
    return_boxes: bool = False,
):
    """Canvases ``[len(indices), 112, 112, 3]`` uint8 for ``items[indices]``.

    Canvas ``i`` uses ``np.random.default_rng([seed, i])`` and clutter from ``clutter_pool``
    (default: ``items``), so any slice of indices reproduces the same bytes.
    """
    pool = items if clutter_pool is None else clutter_pool
    indices = range(len(items)) if indices is None else indices
    out = np.empty((len(indices), CANVAS, CANVAS, 3), dtype=np.uint8)
    boxes = np.empty((len(indices), 3), dtype=np.int32)
    for j, i in enumerate(indices):
        rng = np.random.default_rng([seed, int(i)])
        out[j], boxes[j] = render_canvas(rng, items[int(i)], pool, style)
    return (out, boxes) if return_boxes else out


def canvases_sha256(canvases: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(canvases).tobytes()).hexdigest()
