"""Validate an exported graph or a deployed artifact against the PyTorch module it came from, on real images.

:func:`compare` is the one comparison: a runner (onnxruntime on any provider, a TensorRT engine,
a consumer's recorded outputs: anything with ``infer(feeds) -> outputs``) against a reference
runner (the PyTorch encoder, :class:`TorchRunner`) on a batch of images. Its rows: per output at
batch 1 and batch B, max/mean abs diff and min/mean cosine within the tolerances; kept indices
agreeing as sets up to exact score ties, and in the scorer's top-k order; per-sample batch
independence. :func:`check_graph` adds the graph's own rows (``onnx.checker`` full check, the
expected number of TopK nodes with constant K <= 3840, only the batch axis dynamic).

Tolerances depend on the precision (:data:`PRECISION_TOLERANCES`). The reduced precision presets
are starting points stated up front, not values measured on this project's machines (no GPU): the
cosine thresholds follow what FP16 (10-bit mantissa) and BF16 (7-bit mantissa) rounding through
12-24 blocks typically leave. ``tie_eps`` widens with precision, so kept-patch sets may differ only
where patch scores were within rounding of the k-th score. :data:`MIXED_TOLERANCES` are the
dataset-level criteria for a mixed-precision graph (``prtool.deploy.mixed_check``); they never
loosen the per-image presets. A failed report raises :class:`~prtool.errors.ValidationError`
through :meth:`ValidationReport.raise_if_failed`, the one place its message is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from prtool.errors import PrtoolError, ValidationError
from prtool.export.io_names import PIXELS, as_tuple
from prtool.export.onnx_graph import TRT_MAX_TOPK, dynamic_axes, load_onnx, topk_nodes


@dataclass(frozen=True)
class Tolerances:
    """Per-output tolerances: ``|onnx - torch| <= atol + rtol * |torch|`` elementwise, and cosine.

    The defaults are the FP32 preset: onnxruntime CPU/CUDA and TensorRT FP32 (TF32 off), float round-off only.
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999
    tie_eps: float = 1e-5  # score gap under which two patches count as tied for TopK


PRECISION_TOLERANCES = {
    "fp32": Tolerances(),
    # FP16 with LayerNorm/Softmax in FP32: cosine >= 0.999 per image.
    "fp16": Tolerances(atol=1e-2, rtol=5e-2, min_cosine=0.999, tie_eps=1e-2),
    # BF16 keeps FP32's range but only 8 significant bits: cosine >= 0.99 per image.
    "bf16": Tolerances(atol=3e-2, rtol=1e-1, min_cosine=0.99, tie_eps=3e-2),
}
PRECISION_TOLERANCES["best"] = PRECISION_TOLERANCES["bf16"]  # the loosest type it enables


@dataclass(frozen=True)
class MixedTolerance:
    """Dataset-level criteria for a mixed-precision graph against FP32 PyTorch."""

    min_top1_agreement: float  # fraction of images whose prediction matches FP32 PyTorch's
    max_top1_drop: float  # accuracy points lost against FP32 PyTorch
    min_cosine: float  # worst per-image cosine to the FP32 embedding
    min_kept_agreement: float  # mean |kept ∩ kept_fp32| / k over images


MIXED_TOLERANCES = {"fp16": MixedTolerance(0.99, 0.5, 0.999, 0.99), "bf16": MixedTolerance(0.98, 1.0, 0.99, 0.97)}

# What to do when a row fails, by the kind of check.
FIXES = {
    "graph": "re-export with `prtool export` (the graph itself breaks the contract)",
    "values": "re-export or rebuild, or loosen --atol/--rtol/--min-cosine if the drift is expected at this precision",
    "kept": "re-export, or rebuild at a higher --precision (kept patches differ beyond score ties)",
    "order": "re-export with `prtool export` (the graph does not keep the top-scored patches in order)",
    "batch": "re-export with `prtool export` (a sample's outputs depend on the rest of its batch)",
}


@dataclass
class ValidationReport:
    checks: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    images: str = ""
    tolerances: Tolerances = field(default_factory=Tolerances)  # or the preset of a quantized check (a dataclass)

    def add(self, name: str, passed: bool, detail: str, fix: str = "") -> None:
        self.checks.append({"check": name, "passed": bool(passed), "detail": detail, "fix": fix})

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def failure_summary(self) -> str:
        return "; ".join(f"{c['check']}: {c['detail']}" for c in self.checks if not c["passed"])

    def to_dict(self) -> dict:
        return {"passed": self.passed, "images": self.images, "checks": self.checks, "metrics": self.metrics,
                "tolerances": asdict(self.tolerances)}

    def raise_if_failed(self, subject: str, allow: str, result: dict | None = None) -> None:
        """Raise the one-line :class:`ValidationError` for a failed report: the failed checks, the fix, and
        ``allow`` (how to accept the result anyway). ``result`` is what the command prints with ``--json``."""
        if self.passed:
            return
        fixes = dict.fromkeys(c["fix"] for c in self.checks if not c["passed"] and c["fix"])
        raise ValidationError(f"validation of {subject} failed: {self.failure_summary()}; fix: "
                              f"{'; '.join(fixes) or 'see the checks above'} ({allow})", self, result)


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
               f"set agreement {m['mean_set_agreement']:.4f}, untied differences {m['untied_differences']}",
               FIXES["kept"])
    if scores is not None:
        m["order_violations"] = topk_order_violations(got, scores, tol.tie_eps)
        report.add(f"{name} top-k by score, {label}", m["order_violations"] == 0,
                   f"{m['order_violations']} positions not the top-k of the scores in descending order", FIXES["order"])
    return m


def first_stage_scores(encoder, pixels: torch.Tensor) -> np.ndarray | None:
    """The scorer's patch scores at the first stage (used to recognise exact ties)."""
    if encoder.scorer is None or encoder.schedule.is_empty:
        return None
    with torch.no_grad():
        return encoder.first_stage_scores(pixels).numpy()


def validation_images(images: Path | None, preprocess: dict, count: int) -> tuple[torch.Tensor, str]:
    """At least ``count`` preprocessed images; a small folder is extended with mirrored copies."""
    from prtool.data.images import default_validation_images, list_images, load_image_batch

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
        report.add("onnx.checker full check", False, str(exc).splitlines()[0][:200], FIXES["graph"])
    model = load_onnx(path)
    tk = topk_nodes(model)
    if expected_topk is not None:
        good = len(tk) == expected_topk and all(t["constant_k"] and t["k"] <= TRT_MAX_TOPK for t in tk)
        report.add("TopK nodes", good, f"{len(tk)} found (expected {expected_topk}); K = {[t['k'] for t in tk]}",
                   FIXES["graph"])
    dyn = dynamic_axes(model)
    report.add("only batch axis dynamic", all(a == [0] for a in dyn.values()) and bool(dyn),
               ", ".join(f"{n}: {a}" for n, a in dyn.items()) or "no dynamic axis", FIXES["graph"])


class Runner(Protocol):
    """What :func:`compare` runs: ``{input name: array}`` in, ``{output name: array}`` out. A reference also has
    ``outputs`` (the names compared, in order) and may have ``scores(pixels)`` (first-stage patch scores)."""

    def infer(self, feeds: dict) -> dict[str, np.ndarray]: ...


class TorchRunner:
    """The PyTorch reference as a runner: ``infer({pixel_values: [B, 3, H, W]}) -> {name: array}``, in FP32.

    ``outputs`` name the module's outputs in its order; ``scores`` gives the first stage's patch scores
    (None without a scorer), which the kept-index checks use to recognise exact ties.
    """

    def __init__(self, encoder, outputs: list[str]):
        self.encoder = encoder
        self.outputs = list(outputs)

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = as_tuple(self.encoder(torch.as_tensor(feeds[PIXELS]).float()))
        return dict(zip(self.outputs, (t.numpy() for t in out), strict=True))

    def scores(self, pixels: np.ndarray) -> np.ndarray | None:
        return first_stage_scores(self.encoder, torch.as_tensor(pixels).float())


class RecordedRunner:
    """Outputs recorded for one batch (a runtime run in another process, a consumer's document) as a runner.

    ``infer`` answers only for the batch it recorded, so :func:`compare` takes it with
    ``batch_one=False, independence=False``.
    """

    def __init__(self, outputs: dict[str, np.ndarray], pixels: np.ndarray):
        self.recorded = {k: np.asarray(v) for k, v in outputs.items()}
        self.outputs = list(self.recorded)
        self.pixels = np.asarray(pixels, dtype=np.float32)

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        if not np.array_equal(np.asarray(feeds[PIXELS], dtype=np.float32), self.pixels):
            raise PrtoolError("recorded outputs answer only for the batch they were recorded on: compare them with "
                              "batch_one=False, independence=False")
        return dict(self.recorded)


def _outputs_of(runner, names: list[str]):
    """``run(pixels) -> [array per name]`` through ``runner.infer``; a missing output is the artifact's fault."""

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        out = runner.infer({PIXELS: np.ascontiguousarray(pixels)})
        missing = [n for n in names if n not in out]
        if missing:
            raise PrtoolError(f"the artifact has no output(s) {missing} (it has {sorted(out)}): "
                              "re-export or rebuild it")
        return [np.asarray(out[n]) for n in names]

    return run


def _compare_output(report: ValidationReport, name: str, label: str, got: np.ndarray, ref: np.ndarray,
                    scores: np.ndarray | None, tol: Tolerances) -> dict:
    """The rows of one output at one batch: values (float outputs) or kept indices (integer outputs)."""
    check = f"{name} vs PyTorch, {label}"
    if got.shape != ref.shape:
        report.add(check, False, f"shape {list(got.shape)}, PyTorch's {list(ref.shape)}", FIXES["graph"])
        return {"shape": list(got.shape), "reference_shape": list(ref.shape)}
    if got.dtype.kind != "f":
        return add_kept_checks(report, name, label, got, ref, scores, tol)
    m = compare_embeddings(got, ref, tol)
    report.add(check, m["within_tolerance"],
               f"max abs {m['max_abs']:.2e}, mean abs {m['mean_abs']:.2e}, min cos {m['min_cosine']:.6f}",
               FIXES["values"])
    return m


def _check_batch_independence(report: ValidationReport, run, pixels: np.ndarray, full: list[np.ndarray],
                              tol: Tolerances) -> None:
    """Sample i alone == sample i inside the batch == sample i in the reversed batch."""
    worst = 0.0
    rev = run(pixels[::-1])
    for i in range(pixels.shape[0]):
        for a, f, r in zip(run(pixels[i : i + 1]), full, rev, strict=True):
            if a.dtype.kind == "f":
                worst = max(worst, float(np.abs(a[0] - f[i]).max()), float(np.abs(r[-1 - i] - f[i]).max()))
            elif set(a[0].tolist()) != set(f[i].tolist()) or set(r[-1 - i].tolist()) != set(f[i].tolist()):
                worst = float("inf")
    report.metrics["batch_independence_max_abs"] = worst
    report.add("per-sample batch independence", worst <= tol.atol,
               f"max abs change of a sample's output with its batch: {worst:.2e}", FIXES["batch"])


def compare(runner: Runner, reference: Runner, images, tolerances: Tolerances = Tolerances(), *, batch_one: bool = True,
            independence: bool = True, report: ValidationReport | None = None) -> ValidationReport:
    """Compare ``runner`` with ``reference`` (both ``infer(feeds) -> outputs``) on ``images`` ``[B, 3, H, W]``.

    Every output the reference names (``reference.outputs``) is compared at batch B and, with
    ``batch_one``, at batch 1 (off for an engine whose profile starts above 1); ``independence``
    adds the per-sample batch independence row (it runs every sample alone). Rows are added to
    ``report`` (a new one by default), which is returned; nothing is raised for a failed row.
    """
    report = report if report is not None else ValidationReport()
    report.tolerances = tolerances
    pixels = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    names = list(reference.outputs)
    run = _outputs_of(runner, names)
    ref = _outputs_of(reference, names)(pixels)
    scores = reference.scores(pixels) if hasattr(reference, "scores") else None
    full = run(pixels)
    cases = [(f"batch {pixels.shape[0]}", full, slice(None))]
    if batch_one:
        cases.insert(0, ("batch 1", run(pixels[:1]), slice(0, 1)))
    for label, got, sl in cases:
        for name, o, t in zip(names, got, ref, strict=True):
            sc = None if scores is None else scores[sl]
            report.metrics[f"{name} @ {label}"] = _compare_output(report, name, label, o, t[sl], sc, tolerances)
    if independence:
        _check_batch_independence(report, run, pixels, full, tolerances)
    return report


def validate_onnx(path: Path, encoder, names: list[str], images: Path | None = None, batch_size: int = 7,
                  tolerances: Tolerances = Tolerances(), expected_topk: int | None = None,
                  preprocess: dict | None = None) -> ValidationReport:
    """Check ``path``'s graph and compare it (onnxruntime CPU) with ``encoder`` (PyTorch, FP32, outputs ``names``)."""
    from prtool.runtime.session import OrtRunner

    if batch_size < 2:
        raise PrtoolError("validation needs --batch-size >= 2 to check batching")
    report = ValidationReport(tolerances=tolerances)
    check_graph(report, path, expected_topk)
    pixels, report.images = validation_images(images, preprocess or {}, batch_size)
    return compare(OrtRunner(path), TorchRunner(encoder, names), pixels, tolerances, report=report)
