"""Accuracy of encoders in reduced precision: top-1 and cosine to the same encoder in fp32.

Each encoder (unpruned, pruned by each method) runs over the same images in fp32 and under fp16 /
bf16 autocast on one device. Per (encoder, precision): zero-shot top-1, mean and minimum cosine of
each image's embedding to the fp32 embedding of the same encoder, top-1 agreement with fp32, and the
cosine to the unpruned fp32 embedding. It is the drift a reduced-precision engine (TensorRT fp16,
say) starts from before any engine-specific error.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from prtool.data.datasets import ImageDataset
from prtool.encoder.build import EncoderSpec, build_pruned_encoder
from prtool.encoder.models import LoadedModel
from prtool.util.device import autocast, device_report, resolve_device, synchronize


@torch.inference_mode()
def embed_all(encoder, batches: list[torch.Tensor], device: torch.device, precision: str) -> tuple[np.ndarray, float]:
    """``([n, E] float32 unit embeddings on the host, seconds on the device)`` of ``encoder`` over ``batches``."""
    out = []
    synchronize(device)
    t0 = time.perf_counter()
    for pixels in batches:
        with autocast(device, precision):
            e = encoder(pixels.to(device, non_blocking=True))
        out.append(torch.nn.functional.normalize(e.float(), dim=-1))
    synchronize(device)
    seconds = time.perf_counter() - t0
    return torch.cat(out).cpu().numpy(), seconds


def precision_drift(loaded: LoadedModel, dataset: ImageDataset, specs: dict[str, EncoderSpec],
                    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16"), device: str = "auto",
                    batch_size: int = 250) -> dict:
    """Rows per (encoder name, precision); ``specs`` must hold an unpruned encoder named ``none``."""
    from prtool.data.zeroshot import text_classifier

    dev = resolve_device(device)
    class_emb = text_classifier(loaded, dataset).numpy()  # fp32, on the CPU, before the tower moves
    t0 = time.perf_counter()
    batches, labels = [], []
    for pixels, labs, _ in dataset.batches(batch_size, loaded.preprocess):
        batches.append(pixels)
        labels.append(np.asarray(labs))
    labels = np.concatenate(labels)
    load_seconds = time.perf_counter() - t0
    order = ["fp32"] + [p for p in precisions if p != "fp32"]  # fp32 first: every row compares to it
    emb: dict[tuple[str, str], np.ndarray] = {}
    rows = []
    for name, spec in specs.items():
        encoder, _ = build_pruned_encoder(loaded, spec, normalize=True)
        encoder = encoder.to(dev)
        for prec in order:
            e, seconds = embed_all(encoder, batches, dev, prec)
            emb[name, prec] = e
            rows.append(_row(name, prec, e, emb[name, "fp32"], emb.get(("none", "fp32")), class_emb, labels, seconds))
    return {"model": loaded.model_id, "dataset": dataset.name, "split": dataset.split, "images": int(len(labels)),
            "torch_device": device_report(dev), "load_seconds": round(load_seconds, 2),
            "schedules": {n: s.schedule.to_string() or "none" for n, s in specs.items()}, "rows": rows}


def _row(name: str, prec: str, e: np.ndarray, fp32: np.ndarray, unpruned: np.ndarray | None, class_emb: np.ndarray,
         labels: np.ndarray, seconds: float) -> dict:
    pred, pred32 = (e @ class_emb.T).argmax(1), (fp32 @ class_emb.T).argmax(1)
    cos = (e * fp32).sum(1)
    row = {"encoder": name, "precision": prec, "top1": float(100.0 * (pred == labels).mean()),
           "top1_fp32": float(100.0 * (pred32 == labels).mean()),
           "mean_cosine_to_fp32": float(cos.mean()), "min_cosine_to_fp32": float(cos.min()),
           "top1_agreement_with_fp32": float(100.0 * (pred == pred32).mean()),
           "seconds": round(seconds, 4), "images_per_s": len(labels) / max(seconds, 1e-9)}
    if unpruned is not None:
        row["mean_cosine_to_unpruned_fp32"] = float((e * unpruned).sum(1).mean())
    return row


def markdown_table(result: dict) -> str:
    dev = result["torch_device"]
    head = ["encoder", "schedule", "precision", "top1", "top1 - fp32", "mean cos to fp32", "min cos to fp32",
            "top1 agreement", "cos to unpruned fp32", "img/s"]
    lines = [f"{result['images']} images of {result['dataset']}/{result['split']} on {dev.get('gpu', dev['device'])} "
             "(fp16/bf16 = torch.autocast; fp32 as PyTorch runs it there).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["encoder"], result["schedules"][r["encoder"]], r["precision"], f"{r['top1']:.2f}",
            f"{r['top1'] - r['top1_fp32']:+.2f}", f"{r['mean_cosine_to_fp32']:.6f}", f"{r['min_cosine_to_fp32']:.6f}",
            f"{r['top1_agreement_with_fp32']:.2f}", f"{r.get('mean_cosine_to_unpruned_fp32', float('nan')):.4f}",
            f"{r['images_per_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"
