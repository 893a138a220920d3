"""Checks of a quantized export: its graph (nothing quantized on the ranking/index path) and its outputs
against the FP32 PyTorch model, with their own tolerance preset (the FP32 checks are never loosened).

:func:`check_quantized_graph` is a pure graph function. :func:`validate_quantized` reuses
:mod:`prtool.export.validate`'s graph rows and comparisons and adds quantized rows: cosine to the FP32
embedding, top-1 agreement of the zero-shot head (when the export has ``logits``), kept-index set
agreement, and per-sample batch independence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError

_INT64 = 7  # onnx.TensorProto.INT64


@dataclass(frozen=True)
class QuantTolerances:
    """The quantized preset: a quantized graph is compared with FP32 PyTorch by these, per mode."""

    min_cosine: float = 0.99  # per image, embedding vs FP32 PyTorch
    min_mean_cosine: float = 0.995
    min_top1_agreement: float = 0.97  # logits argmax vs FP32 (exports with a classifier head)
    min_kept_agreement: float = 0.90  # mean kept-index set agreement vs FP32
    batch_atol: float = 1e-4  # static scales: a sample's output does not depend on its batch
    batch_min_cosine: float = 0.999  # dynamic scales (per batch at run time): close, not exact
    batch_min_kept: float = 0.98  # dynamic: kept sets of a sample alone vs in a batch (near-ties may flip)


PRESETS = {"int8-dynamic": QuantTolerances(), "int8-qdq": QuantTolerances(),
           "fp16": QuantTolerances(min_cosine=0.999, min_mean_cosine=0.9995, min_kept_agreement=0.97)}


# the ops a quantizer adds: none may touch the never-quantized path (prtool.export.quantize.never_quantized)
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
             "QLinearMatMul", "QLinearConv")


def _producers(model) -> dict[str, object]:
    return {t: n for n in model.graph.node for t in n.output}


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def check_quantized_graph(model, never: list[str]) -> list[str]:
    """What a quantized graph gets wrong: a node of ``never`` missing, fed by a dequantize or feeding a
    quantize, a TopK whose K is not a constant, or an index path that is not int64."""
    from prtool.export.mixed_precision import index_path_nodes
    from prtool.export.onnx_graph import topk_nodes

    nodes = {n.name: n for n in model.graph.node}
    prod, cons = _producers(model), _consumers(model)
    problems = [f"node {name} is gone (rewritten by the quantizer)" for name in never if name not in nodes]
    for name in (n for n in never if n in nodes):
        node = nodes[name]
        fed = [t for t in node.input if t in prod and prod[t].op_type in QUANT_OPS]
        feeds = [c.name for t in node.output for c in cons.get(t, []) if c.op_type in QUANT_OPS]
        if fed or feeds:
            problems.append(f"{node.op_type} {name} is quantized (input from {fed or '-'}, output to {feeds or '-'})")
    problems += [f"TopK {t['name']} has a computed K" for t in topk_nodes(model) if not t["constant_k"]]
    types = _tensor_types(model)
    index = [t for n in model.graph.node if n.op_type == "TopK" for t in n.output[1:2]]
    index += [t for name in index_path_nodes(model) for t in nodes[name].output]
    problems += [f"index tensor {t} is not int64" for t in index if types.get(t, _INT64) != _INT64]
    return problems


def _tensor_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a.astype(np.float64) * b).sum(-1)


def compare_quantized(names: list[str], got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Per output: cosine (float), top-1 agreement (``logits``), kept-index set agreement (integer)."""
    from prtool.export.validate import compare_kept

    out = {}
    for name, g, r in zip(names, got, ref):
        if g.dtype.kind != "f":
            out[name] = compare_kept(g, r, None, 0.0)
            continue
        cos = _cosine(g, r)
        out[name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if name == "logits":
            out[name]["top1_agreement"] = float((g.argmax(-1) == r.argmax(-1)).mean())
    return out


def _add_rows(report, label: str, metrics: dict, tol: QuantTolerances) -> None:
    for name, m in metrics.items():
        if "mean_set_agreement" in m:
            report.add(f"{name} vs FP32 PyTorch, {label}", m["mean_set_agreement"] >= tol.min_kept_agreement,
                       f"set agreement {m['mean_set_agreement']:.4f} (min {m['min_set_agreement']:.4f}; "
                       f">= {tol.min_kept_agreement})")
            continue
        ok = m["min_cosine"] >= tol.min_cosine and m["mean_cosine"] >= tol.min_mean_cosine
        detail = f"min cos {m['min_cosine']:.5f}, mean cos {m['mean_cosine']:.5f}"
        if "top1_agreement" in m:
            ok = ok and m["top1_agreement"] >= tol.min_top1_agreement
            detail += f", top-1 agreement {m['top1_agreement']:.4f}"
        report.add(f"{name} vs FP32 PyTorch, {label}", ok, detail)


def batch_independence(sess, pixels: np.ndarray) -> dict:
    """Worst change of a sample's outputs with its batch: alone vs in the batch vs in the reversed batch."""
    name = sess.get_inputs()[0].name
    full = sess.run(None, {name: pixels})
    rev = sess.run(None, {name: pixels[::-1].copy()})
    worst_abs, worst_cos, changes, agree = 0.0, 1.0, 0, 1.0
    for i in range(len(pixels)):
        alone = sess.run(None, {name: pixels[i : i + 1]})
        for a, f, r in zip(alone, full, rev):
            for other in (a[0], r[-1 - i]):
                if a.dtype.kind == "f":
                    worst_abs = max(worst_abs, float(np.abs(other - f[i]).max()))
                    worst_cos = min(worst_cos, float(_cosine(other, f[i])))
                else:
                    same = len(set(other.tolist()) & set(f[i].tolist())) / len(f[i])
                    changes, agree = changes + int(same < 1), min(agree, same)
    return {"max_abs": worst_abs, "min_cosine": worst_cos, "kept_set_changes": changes, "min_kept_agreement": agree}


def validate_quantized(path: Path, encoder, mode: str, images: Path | None = None, batch_size: int = 7,
                       expected_topk: int | None = None, preprocess: dict | None = None,
                       tolerances: QuantTolerances | None = None):
    """A :class:`prtool.export.validate.ValidationReport` of the quantized ``path`` against FP32 ``encoder``."""
    from prtool.export.validate import ValidationReport, check_graph, validation_images
    from prtool.runtime.session import ort_session

    if batch_size < 2:
        raise PrtoolError("validation needs --batch-size >= 2 to check batching")
    tol = tolerances or PRESETS[mode]
    report = ValidationReport(tolerances=tol)
    check_graph(report, path, expected_topk)
    pixels, report.images = validation_images(images, preprocess or {}, batch_size)
    pixels = pixels.float().contiguous()
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    with torch.no_grad():
        out = encoder(pixels)
    ref = [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
    x, in_name = pixels.numpy(), sess.get_inputs()[0].name
    for label, sl in (("batch 1", slice(0, 1)), (f"batch {batch_size}", slice(None))):
        metrics = compare_quantized(names, sess.run(None, {in_name: x[sl]}),
                                    [r[sl] for r in ref])
        report.metrics.update({f"{k} @ {label}": v for k, v in metrics.items()})
        _add_rows(report, label, metrics, tol)
    b = batch_independence(sess, x)
    report.metrics["batch_independence"] = b
    static = mode != "int8-dynamic"
    ok = (b["kept_set_changes"] == 0 and b["max_abs"] <= tol.batch_atol if static else
          b["min_cosine"] >= tol.batch_min_cosine and b["min_kept_agreement"] >= tol.batch_min_kept)
    report.add("per-sample batch independence", ok,
               f"max abs {b['max_abs']:.2e}, min cos {b['min_cosine']:.6f}, kept-set changes {b['kept_set_changes']} "
               f"(min agreement {b['min_kept_agreement']:.4f})"
               + ("" if static else "; dynamic INT8 scales follow the batch: bounded, not exact"))
    return report
