"""Validate an exported graph against the PyTorch module it came from, on real images.

Checks (each a row of the report): ``onnx.checker`` full check; the expected number of TopK
nodes, each with a constant K <= 3840; only the batch axis dynamic; onnxruntime vs PyTorch at
batch 1 and at batch B (per output max/mean abs diff, min/mean cosine, kept indices agreeing as
sets up to exact score ties); per-sample batch independence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError
from prtool.onnx_graph import TRT_MAX_TOPK, dynamic_axes, load_onnx, topk_nodes


@dataclass(frozen=True)
class Tolerances:
    """Per-output tolerances: ``|onnx - torch| <= atol + rtol * |torch|`` elementwise, and cosine."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999
    tie_eps: float = 1e-5  # score gap under which two patches count as tied for TopK


@dataclass
class ValidationReport:
    checks: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    images: str = ""
    tolerances: Tolerances = field(default_factory=Tolerances)

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"check": name, "passed": bool(passed), "detail": detail})

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def failure_summary(self) -> str:
        return "; ".join(f"{c['check']}: {c['detail']}" for c in self.checks if not c["passed"])

    def to_dict(self) -> dict:
        t = self.tolerances
        return {"passed": self.passed, "images": self.images, "checks": self.checks, "metrics": self.metrics,
                "tolerances": {"atol": t.atol, "rtol": t.rtol, "min_cosine": t.min_cosine, "tie_eps": t.tie_eps}}


def ort_session(path: Path, providers: list[str] | None = None):
    """A quiet onnxruntime session whose idle intra-op threads sleep instead of spinning.

    prtool keeps several sessions alive and runs them in turn (interleaved timing, validation):
    with spinning on, the threads of the session that just ran keep 2 cores busy while the next one
    runs, which made a 5-variant demo report 1.14x where the same graphs run 1.33x apart.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare_embeddings(ort_out: np.ndarray, torch_out: np.ndarray, tol: Tolerances) -> dict:
    diff = np.abs(ort_out.astype(np.float64) - torch_out.astype(np.float64))
    bound = tol.atol + tol.rtol * np.abs(torch_out)
    a = ort_out / np.maximum(np.linalg.norm(ort_out, axis=-1, keepdims=True), 1e-12)
    b = torch_out / np.maximum(np.linalg.norm(torch_out, axis=-1, keepdims=True), 1e-12)
    cos = (a * b).sum(-1)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "median_abs": float(np.median(diff)),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "within_tolerance": bool((diff <= bound).all()) and float(cos.min()) >= tol.min_cosine}


def compare_kept(ort_idx: np.ndarray, torch_idx: np.ndarray, scores: np.ndarray | None, tie_eps: float) -> dict:
    """Agreement of kept-index sets per sample; differences are allowed only between tied scores."""
    k = ort_idx.shape[1]
    agree, untied = [], 0
    for i in range(ort_idx.shape[0]):
        so, st = set(ort_idx[i].tolist()), set(torch_idx[i].tolist())
        agree.append(len(so & st) / k)
        diff = so ^ st
        if diff:
            if scores is None:
                untied += len(diff)
                continue
            boundary = np.sort(scores[i])[::-1][k - 1]
            untied += sum(1 for j in diff if abs(scores[i][j] - boundary) > tie_eps * max(1.0, abs(boundary)))
    return {"mean_set_agreement": float(np.mean(agree)), "min_set_agreement": float(np.min(agree)),
            "untied_differences": int(untied)}


def topk_order_violations(idx: np.ndarray, scores: np.ndarray, tie_eps: float) -> int:
    """Positions ``j`` where ``idx[i, j]`` is not the patch with the j-th highest score (beyond ``tie_eps``).

    The contract: kept indices are the top-k of the first-stage scores, most important first. This
    is checked against the scorer's own scores, so it catches a TopK that PyTorch and ONNX share.
    """
    bad = 0
    for row, s in zip(idx, scores):
        want = np.sort(s)[::-1][: len(row)]
        bad += int((np.abs(s[row] - want) > tie_eps * np.maximum(1.0, np.abs(want))).sum())
    return bad


def add_kept_checks(report: ValidationReport, name: str, label: str, got: np.ndarray, ref: np.ndarray,
                    scores: np.ndarray | None, tol: Tolerances) -> dict:
    """Report rows for a kept-index output: agreement with PyTorch, and (with scores) top-k in score order."""
    m = compare_kept(got, ref, scores, tol.tie_eps)
    report.add(f"{name} vs PyTorch, {label}", m["untied_differences"] == 0,
               f"set agreement {m['mean_set_agreement']:.4f}, untied differences {m['untied_differences']}")
    if scores is not None:
        m["order_violations"] = topk_order_violations(got, scores, tol.tie_eps)
        report.add(f"{name} top-k by score, {label}", m["order_violations"] == 0,
                   f"{m['order_violations']} positions not the top-k of the scores in descending order")
    return m


def first_stage_scores(encoder, pixels: torch.Tensor) -> np.ndarray | None:
    """The scorer's patch scores at the first stage (used to recognise exact ties)."""
    if encoder.scorer is None or encoder.schedule.is_empty:
        return None
    with torch.no_grad():
        return encoder.first_stage_scores(pixels).numpy()


def validation_images(images: Path | None, preprocess: dict, count: int) -> tuple[torch.Tensor, str]:
    """At least ``count`` preprocessed images; a small folder is extended with mirrored copies."""
    from prtool.images import default_validation_images, list_images, load_image_batch

    if images is None:
        return default_validation_images(preprocess, count)
    files = list_images(images)[:count]
    batch = load_image_batch(files, preprocess)
    source = f"{images} ({len(files)} images)"
    while batch.shape[0] < count:
        batch = torch.cat([batch, batch.flip(-1)])[:count]
        source += " + mirrored copies"
    return batch, source


def check_graph(report: ValidationReport, path: Path, expected_topk: int | None) -> None:
    """The graph's own rows: ``onnx.checker``, the TopK count with constant K, batch-only dynamic axes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        report.add("onnx.checker full check", True, "ok")
    except Exception as exc:  # checker raises ValidationError / InferenceError
        report.add("onnx.checker full check", False, str(exc).splitlines()[0][:200])
    model = load_onnx(path)
    tk = topk_nodes(model)
    if expected_topk is not None:
        good = len(tk) == expected_topk and all(t["constant_k"] and t["k"] <= TRT_MAX_TOPK for t in tk)
        report.add("TopK nodes", good, f"{len(tk)} found (expected {expected_topk}); K = {[t['k'] for t in tk]}")
    dyn = dynamic_axes(model)
    report.add("only batch axis dynamic", all(a == [0] for a in dyn.values()) and bool(dyn),
               ", ".join(f"{n}: {a}" for n, a in dyn.items()) or "no dynamic axis")


def validate_onnx(path: Path, encoder, images: Path | None = None, batch_size: int = 7,
                  tolerances: Tolerances = Tolerances(), expected_topk: int | None = None,
                  preprocess: dict | None = None) -> ValidationReport:
    """Compare ``path`` (run in onnxruntime CPU) with ``encoder`` (PyTorch, fp32) and report."""
    if batch_size < 2:
        raise PrtoolError("validation needs --batch-size >= 2 to check batching")
    report = ValidationReport(tolerances=tolerances)
    check_graph(report, path, expected_topk)
    pixels, report.images = validation_images(images, preprocess or {}, batch_size)
    pixels = pixels.float().contiguous()
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    in_name = sess.get_inputs()[0].name
    with torch.no_grad():
        torch_full = [t.numpy() for t in _as_tuple(encoder(pixels))]
    scores = first_stage_scores(encoder, pixels)
    ort_full = sess.run(None, {in_name: pixels.numpy()})
    ort_one = sess.run(None, {in_name: pixels[:1].numpy()})
    for label, ort_out, sl in (("batch 1", ort_one, slice(0, 1)), (f"batch {batch_size}", ort_full, slice(None))):
        for name, o, t in zip(names, ort_out, torch_full):
            t = t[sl]
            if o.dtype.kind == "f":
                m = compare_embeddings(o, t, tolerances)
                report.metrics[f"{name} @ {label}"] = m
                report.add(f"{name} vs PyTorch, {label}", m["within_tolerance"],
                           f"max abs {m['max_abs']:.2e}, mean abs {m['mean_abs']:.2e}, min cos {m['min_cosine']:.6f}")
            else:
                report.metrics[f"{name} @ {label}"] = add_kept_checks(report, name, label, o, t,
                                                                      None if scores is None else scores[sl], tolerances)
    # Batch independence: sample i alone == sample i inside the batch == sample i in the reversed batch.
    worst = 0.0
    rev = sess.run(None, {in_name: pixels.flip(0).numpy()})
    for i in range(pixels.shape[0]):
        alone = sess.run(None, {in_name: pixels[i : i + 1].numpy()})
        for a, full, r in zip(alone, ort_full, rev):
            if a.dtype.kind == "f":
                worst = max(worst, float(np.abs(a[0] - full[i]).max()), float(np.abs(r[-1 - i] - full[i]).max()))
            elif set(a[0].tolist()) != set(full[i].tolist()) or set(r[-1 - i].tolist()) != set(full[i].tolist()):
                worst = float("inf")
    report.metrics["batch_independence_max_abs"] = worst
    report.add("per-sample batch independence", worst <= tolerances.atol,
               f"max abs change of a sample's output with its batch: {worst:.2e}")
    return report
