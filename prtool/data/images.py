"""Reading images and preprocessing them exactly as the model's manifest says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prtool.errors import PrtoolError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def list_images(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise PrtoolError(f"image directory {directory} does not exist: pass a folder of images with --images")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrtoolError(
            f"image directory {directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add some or pass "
            "another --images"
        )
    return files


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; a corrupt file is an error naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PrtoolError(f"cannot read image {path}: {exc}; remove or replace the file") from None


_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def preprocess_image(img: Image.Image, pre: dict) -> torch.Tensor:
    """PIL RGB image -> ``[3, H, W]`` float32: shortest side to size, center crop, /255, mean/std."""
    h, w = pre["image_size"]
    interp = _INTERP.get(pre.get("interpolation", "bicubic"), Image.BICUBIC)
    scale = max(h / img.height, w / img.width)
    if (img.width, img.height) != (w, h):
        new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
        img = img.resize(new, interp)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def load_image_batch(paths: list[Path], pre: dict) -> torch.Tensor:
    return torch.stack([preprocess_image(read_image(p), pre) for p in paths])


def arrays_to_batch(canvases: np.ndarray, pre: dict) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> preprocessed ``[B, 3, h, w]`` (resized when sizes differ)."""
    if tuple(canvases.shape[1:3]) == tuple(pre["image_size"]):
        x = torch.tensor(canvases).permute(0, 3, 1, 2).float() / 255.0  # copies: the testbed arrays are read-only
        mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1)
        return (x - mean) / std
    return torch.stack([preprocess_image(Image.fromarray(c), pre) for c in canvases])


def default_validation_images(pre: dict, count: int = 8) -> tuple[torch.Tensor, str]:
    """The first ``count`` shipped testbed eval canvases (real Fashion-MNIST photos on texture)."""
    from prtool.testbed.eval_set import load_eval_canvases

    canvases, _ = load_eval_canvases(limit=count)
    return arrays_to_batch(canvases, pre), f"testbed eval canvases 0..{count - 1}"
