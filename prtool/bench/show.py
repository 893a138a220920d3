"""``prtool show``: for a few images, the kept patches per stage under each available ranking
(golden from a store, the trained predictor, CLS attention), side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prtool.bench.visualize import save_rows, stage_panels
from prtool.encoder.build import EncoderSpec, build_pruned_encoder
from prtool.errors import PrtoolError


def display_image(dataset, i: int, size: tuple[int, int]) -> np.ndarray:
    """The image as the model sees it (resized and center-cropped), uint8 ``[H, W, 3]``."""
    if dataset.arrays is not None:
        arr = dataset.arrays[dataset.samples[i][0]]
        img = Image.fromarray(arr)
    else:
        from prtool.data.images import read_image

        img = read_image(dataset.samples[i][0])
    h, w = size
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)))


def _orders(loaded, dataset, schedule, rows, rankings, predictor) -> dict[str, np.ndarray]:
    """Ranking (most important first) per method for ``rows``: ``{name: [len(rows), N]}``."""
    out: dict[str, np.ndarray] = {}
    block = schedule.first_block
    if rankings is not None:
        from prtool.ranking.store import load_store

        store = load_store(rankings)
        where = store.row_of()
        missing = [dataset.sample_id(r) for r in rows if dataset.sample_id(r) not in where]
        if missing:
            raise PrtoolError(f"rankings {rankings} have no ranking for {missing[0]}: pass the ranked --data/--split")
        if store.index["rank_block"] != block:
            raise PrtoolError(f"rankings are for block {store.index['rank_block']}, the schedule starts at {block}")
        out["golden"] = np.stack([store.rankings[where[dataset.sample_id(r)]] for r in rows])
    pixels, _, _ = dataset.load(rows, loaded.preprocess)
    scorers = [("predictor", predictor)] if predictor is not None else []
    scorers.append(("cls-attn", None))
    for name, path in scorers:
        enc, _ = build_pruned_encoder(loaded, EncoderSpec(schedule, name, path))
        with torch.no_grad():
            scores = enc.first_stage_scores(pixels)
        out[name] = torch.argsort(scores, dim=1, descending=True, stable=True).numpy()
    return out


def render_show(loaded, dataset, schedule, out: Path, rankings: Path | None, predictor: Path | None,
                count: int = 6) -> dict:
    if schedule.is_empty:
        raise PrtoolError("prtool show needs a pruning schedule (--schedule or --keep-ratio)")
    rows = list(range(min(count, len(dataset))))
    orders = _orders(loaded, dataset, schedule, rows, rankings, predictor)
    grid = tuple(loaded.visual.grid_size)
    size = tuple(loaded.preprocess["image_size"])
    sheet = []
    for j, r in enumerate(rows):
        img = display_image(dataset, r, size)
        panels = [stage_panels(img, order[j], list(schedule.keep), grid,
                               titles=[f"{name}: keep {k}" for k in schedule.keep]) for name, order in orders.items()]
        width = sum(p.width for p in panels) + 12 * (len(panels) - 1)
        row = Image.new("RGB", (width, panels[0].height), "white")
        x = 0
        for p in panels:
            row.paste(p, (x, 0))
            x += p.width + 12
        sheet.append(row)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_rows(sheet, out)
    return {"out": str(out), "images": len(rows), "rows": list(orders), "schedule": schedule.to_string()}
