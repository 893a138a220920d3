"""Pictures of kept patches: the image with pruned patches greyed out, one panel per stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def grey_out(image: np.ndarray, kept: np.ndarray, grid: tuple[int, int], fade: float = 0.8) -> np.ndarray:
    """``image`` uint8 ``[H, W, 3]`` with every patch not in ``kept`` (row-major indices) faded to grey."""
    h, w = image.shape[:2]
    ph, pw = h // grid[0], w // grid[1]
    mask = np.zeros(grid[0] * grid[1], dtype=bool)
    mask[np.asarray(kept, dtype=np.int64)] = True
    mask = mask.reshape(grid).repeat(ph, 0).repeat(pw, 1)
    out = image.astype(np.float32).copy()
    grey = np.full_like(out, 128.0)
    out[~mask] = out[~mask] * (1 - fade) + grey[~mask] * fade
    return out.astype(np.uint8)


def stage_panels(image: np.ndarray, order: np.ndarray, keep: list[int], grid: tuple[int, int], scale: int = 2,
                 titles: list[str] | None = None) -> Image.Image:
    """One panel per stage: stage j keeps the first ``keep[j]`` of ``order`` (most important first)."""
    panels = [("input", image)] + [
        (titles[j] if titles else f"keep {k}/{grid[0] * grid[1]}", grey_out(image, order[:k], grid))
        for j, k in enumerate(keep)
    ]
    h, w = image.shape[0] * scale, image.shape[1] * scale
    canvas = Image.new("RGB", (len(panels) * (w + 6), h + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, arr) in enumerate(panels):
        canvas.paste(Image.fromarray(arr).resize((w, h), Image.NEAREST), (i * (w + 6), 16))
        draw.text((i * (w + 6) + 2, 2), title, fill="black")
    return canvas


def save_rows(rows: list[Image.Image], path: Path) -> None:
    """Stack several panel rows vertically into one PNG (written atomically)."""
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
