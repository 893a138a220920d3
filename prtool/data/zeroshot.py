"""Zero-shot classification: class text embeddings and top-k accuracy of any image encoder."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
)


def class_text_embeddings(model, tokenizer, class_prompts: list[list[str]], batch_size: int = 256) -> torch.Tensor:
    """``[C, E]`` unit vectors: per class, the normalized mean of its normalized prompt embeddings."""
    rows = []
    with torch.no_grad():
        for prompts in class_prompts:
            embs = []
            for i in range(0, len(prompts), batch_size):
                embs.append(F.normalize(model.encode_text(tokenizer(prompts[i : i + batch_size])).float(), dim=-1))
            rows.append(F.normalize(torch.cat(embs).mean(0), dim=-1))
    return torch.stack(rows)


def text_classifier(loaded, dataset) -> torch.Tensor:
    """``[C, E]`` class embeddings of a dataset's prompts (``dataset.class_prompts``) for a loaded model."""
    return class_text_embeddings(loaded.model, loaded.tokenizer(), dataset.class_prompts)


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, int]:
    order = np.argsort(-logits, axis=1, kind="stable")
    return {k: int((order[:, :k] == labels[:, None]).any(1).sum()) for k in ks if k <= logits.shape[1]}


Embedder = Callable[[torch.Tensor, list], np.ndarray]


def evaluate_embeddings(embed: Embedder, batches: Iterable, class_emb: torch.Tensor | None,
                        reference: Embedder | None = None, hits_out: list | None = None) -> dict:
    """Top-1/top-5 of ``embed(pixels, rows)`` over ``(pixels, labels, rows)`` batches; with
    ``reference``, also the mean cosine to the reference embeddings and top-1 agreement. With
    ``hits_out``, one bool array ``[n]`` of per-image top-1 hits is appended to it (paired comparisons).
    ``class_emb=None`` means ``embed`` already returns class logits (an export's own classifier head)."""
    w = None if class_emb is None else class_emb.numpy().astype(np.float32)
    correct = {1: 0, 5: 0}
    n, cos_sum, agree, hits = 0, 0.0, 0, []
    for pixels, labels, rows in batches:
        e = embed(pixels, rows)
        if w is None:
            logits = e
        else:
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            logits = e @ w.T
        for k, c in topk_correct(logits, np.asarray(labels)).items():
            correct[k] += c
        hits.append(logits.argmax(1) == np.asarray(labels))
        if reference is not None:
            r = reference(pixels, rows)
            r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
            cos_sum += float((e * r).sum(1).sum())
            agree += int((logits.argmax(1) == (r @ w.T).argmax(1)).sum())
        n += len(labels)
    if hits_out is not None:
        hits_out.append(np.concatenate(hits) if hits else np.zeros(0, dtype=bool))
    out = {"images": n, "top1": 100.0 * correct[1] / n}
    if logits.shape[1] >= 5:
        out["top5"] = 100.0 * correct[5] / n
    if reference is not None:
        out["mean_cosine_to_reference"] = cos_sum / n
        out["top1_agreement_with_reference"] = 100.0 * agree / n
    return out


def torch_embedder(module: torch.nn.Module,
                   scores_for: Callable[[torch.Tensor, list], torch.Tensor] | None = None) -> Embedder:
    """``module(pixels)``; with ``scores_for(pixels, rows)``, oracle patch scores are passed in too."""

    def embed(pixels: torch.Tensor, rows) -> np.ndarray:
        with torch.no_grad():
            out = module(pixels) if scores_for is None else module(pixels, scores_for(pixels, rows))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().numpy()

    return embed


def onnx_embedder(session) -> Embedder:
    name = session.get_inputs()[0].name

    def embed(pixels: torch.Tensor, rows) -> np.ndarray:
        return session.run(None, {name: pixels.numpy().astype(np.float32)})[0]

    return embed
