"""Zero-shot accuracy of a (pruned) image encoder, in PyTorch or from an exported ONNX file."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from prtool.data.datasets import ImageDataset
from prtool.data.zeroshot import evaluate_embeddings, onnx_embedder, text_classifier, torch_embedder
from prtool.encoder.build import EncoderSpec, build_pruned_encoder
from prtool.encoder.models import LoadedModel
from prtool.errors import PrtoolError
from prtool.export.io_names import LOGITS
from prtool.ranking.store import load_store
from prtool.util.progress import progress_bar


def _progress_batches(dataset: ImageDataset, batch_size: int, preprocess: dict, label: str, skip_bad: bool = False):
    total = (len(dataset) + batch_size - 1) // batch_size
    with progress_bar(total, label) as bar:
        for batch in dataset.batches(batch_size, preprocess, skip_bad):
            yield batch
            bar.update(1)


def _onnx_logits_head(session, path: Path, dataset: ImageDataset) -> tuple:
    """``(embedder returning the export's own logits, manifest)`` for an export with a classifier head
    (e.g. ``--tokens --classifier``), after checking that its classes are the dataset's, in order."""
    import json

    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    names = manifest.get("classnames")
    if names is not None and [c.replace("_", " ") for c in names] != [c.replace("_", " ") for c in dataset.classnames]:
        raise PrtoolError(f"{path}'s classifier head has classes {names[:3]}..., not {dataset.name}'s "
                          f"{dataset.classnames[:3]}...: export with --classifier for this dataset")
    inp = session.get_inputs()[0].name
    col = [o.name for o in session.get_outputs()].index(LOGITS)

    def logits(pixels: torch.Tensor, rows) -> np.ndarray:
        out = session.run(None, {inp: pixels.numpy().astype(np.float32)})[col]
        if out.shape[1] != len(dataset.classnames):
            raise PrtoolError(f"{path} has {out.shape[1]} classes in its logits, {dataset.name} has "
                              f"{len(dataset.classnames)}: export with --classifier for this dataset")
        return out

    return logits, manifest


def evaluate_zero_shot(loaded: LoadedModel, dataset: ImageDataset, spec: EncoderSpec | None = None,
                       onnx_path: Path | None = None, batch_size: int = 64, compare_unpruned: bool = True,
                       class_emb: torch.Tensor | None = None, skip_bad: bool = False,
                       rankings: Path | None = None, hits_out: list | None = None) -> dict:
    """Top-1/top-5 on ``dataset``; pruned runs also report cosine/top-1 agreement with the unpruned model.

    A golden-ranked method prunes each image by its own golden ranking from ``rankings``.
    """
    from prtool.encoder.schedule import Schedule

    if not dataset.classnames or (dataset.labels < 0).any():
        raise PrtoolError(f"zero-shot accuracy needs labelled images with class names; {dataset.name} has none")
    n, depth = loaded.visual.grid_size[0] * loaded.visual.grid_size[1], len(loaded.visual.transformer.resblocks)
    spec = spec or EncoderSpec(Schedule((), n, depth))
    manifest = None  # set when the export carries its own classifier head
    if onnx_path is not None:
        from prtool.runtime.session import ort_session

        if not Path(onnx_path).exists():
            raise PrtoolError(f"ONNX file {onnx_path} does not exist")
        session = ort_session(onnx_path)
        if LOGITS in [o.name for o in session.get_outputs()]:
            embed, manifest = _onnx_logits_head(session, Path(onnx_path), dataset)
        else:
            embed = onnx_embedder(session)
        backend = "onnxruntime"
    else:
        encoder, _ = build_pruned_encoder(loaded, spec, normalize=True)
        scores_for = None  # oracle rankers (golden, brightness) score each image outside the graph
        if encoder.scorer is not None:
            store = load_store(rankings) if rankings is not None and encoder.method.needs == "rankings" else None
            scores_for = encoder.scorer.image_scores(loaded, dataset, store, spec.schedule.first_block)
        embed = torch_embedder(encoder, scores_for)
        backend = "torch"
    reference = None
    if manifest is None:
        class_emb = text_classifier(loaded, dataset) if class_emb is None else class_emb
        if compare_unpruned and not spec.schedule.is_empty:
            baseline, _ = build_pruned_encoder(loaded, EncoderSpec(Schedule((), n, depth)), normalize=True)
            reference = torch_embedder(baseline)
    t0 = time.perf_counter()
    result = evaluate_embeddings(embed, _progress_batches(dataset, batch_size, loaded.preprocess, "eval", skip_bad),
                                 None if manifest is not None else class_emb, reference, hits_out)
    schedule, scorer = spec.schedule.to_string() or "none", None if spec.schedule.is_empty else spec.scorer
    if manifest is not None:  # the export's own graph decides what was pruned
        result["head"] = "onnx logits"
        schedule = (manifest.get("schedule") or {}).get("string", schedule) or "none"
        scorer = manifest.get("scorer", scorer)
    result.update({"backend": backend, "dataset": dataset.name, "split": dataset.split, "schedule": schedule,
                   "scorer": scorer, "seconds": round(time.perf_counter() - t0, 2),
                   "skipped_images": list(dataset.skipped)})
    return result
