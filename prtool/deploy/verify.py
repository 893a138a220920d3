"""``prtool validate``: compare a deployed artifact (TensorRT engine or ONNX on a provider) with PyTorch.

The PyTorch encoder is rebuilt from the artifact's manifest (``prtool.deploy.rebuild``) and run
in FP32 on real images; the artifact runs the same images at batch 1 and batch B. Each output
is compared with ``prtool.validate``'s metrics, and per-sample batch independence is checked
(sample i alone == sample i in the batch == sample i in the reversed batch).

Tolerances depend on the artifact's precision (:data:`PRECISION_TOLERANCES`). The reduced
precision presets are starting points stated up front, not values measured on this project's
machines (no GPU): the cosine thresholds follow what FP16 (10-bit mantissa) and BF16 (7-bit
mantissa) rounding through 12-24 blocks typically leave. ``tie_eps`` widens with precision, so
kept-patch sets may differ only where patch scores were within rounding of the k-th score.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError
from prtool.validate import Tolerances, ValidationReport, add_kept_checks, compare_embeddings, first_stage_scores

PRECISION_TOLERANCES = {
    # onnxruntime CPU/CUDA and TensorRT FP32 (TF32 off): float round-off only.
    "fp32": Tolerances(atol=1e-4, rtol=1e-3, min_cosine=0.9999, tie_eps=1e-5),
    # FP16 with LayerNorm/Softmax in FP32: cosine >= 0.999 per image.
    "fp16": Tolerances(atol=1e-2, rtol=5e-2, min_cosine=0.999, tie_eps=1e-2),
    # BF16 keeps FP32's range but only 8 significant bits: cosine >= 0.99 per image.
    "bf16": Tolerances(atol=3e-2, rtol=1e-1, min_cosine=0.99, tie_eps=3e-2),
}
PRECISION_TOLERANCES["best"] = PRECISION_TOLERANCES["bf16"]  # the loosest type it enables


def compare_runner(infer, encoder, pixels: torch.Tensor, names: list[str], tolerances: Tolerances,
                   batch_one: bool = True) -> ValidationReport:
    """Run ``infer`` (``[B, 3, H, W]`` float32 -> ``{name: array}``) against ``encoder`` on ``pixels``.

    ``names`` are the outputs in the encoder's order (``image_embeds`` then ``kept_patch_indices``).
    ``batch_one=False`` skips the batch-1 comparison (an engine whose profile starts above 1).
    """
    report = ValidationReport(tolerances=tolerances)
    pixels = pixels.float().contiguous()
    b = pixels.shape[0]
    with torch.no_grad():
        ref = encoder(pixels)
    ref = [t.numpy() for t in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    scores = first_stage_scores(encoder, pixels)

    def run(x: torch.Tensor) -> list[np.ndarray]:
        out = infer(x.numpy())
        missing = [n for n in names if n not in out]
        if missing:
            raise PrtoolError(f"the artifact has no output(s) {missing} (it has {sorted(out)}): re-export or rebuild it")
        return [out[n] for n in names]

    full = run(pixels)
    cases = [(f"batch {b}", full, slice(None))]
    if batch_one:
        cases.insert(0, ("batch 1", run(pixels[:1]), slice(0, 1)))
    for label, got, sl in cases:
        for name, o, t in zip(names, got, ref, strict=True):
            t = t[sl]
            if o.dtype.kind == "f":
                m = compare_embeddings(o, t, tolerances)
                report.add(f"{name} vs PyTorch, {label}", m["within_tolerance"],
                           f"max abs {m['max_abs']:.2e}, mean abs {m['mean_abs']:.2e}, min cos {m['min_cosine']:.6f}")
            else:
                m = add_kept_checks(report, name, label, o, t, None if scores is None else scores[sl], tolerances)
            report.metrics[f"{name} @ {label}"] = m
    worst = 0.0
    rev = run(pixels.flip(0))
    for i in range(b):
        alone = run(pixels[i : i + 1])
        for a, f, r in zip(alone, full, rev, strict=True):
            if a.dtype.kind == "f":
                worst = max(worst, float(np.abs(a[0] - f[i]).max()), float(np.abs(r[-1 - i] - f[i]).max()))
            elif set(a[0].tolist()) != set(f[i].tolist()) or set(r[-1 - i].tolist()) != set(f[i].tolist()):
                worst = float("inf")
    report.metrics["batch_independence_max_abs"] = worst
    report.add("per-sample batch independence", worst <= tolerances.atol,
               f"max abs change of a sample's output with its batch: {worst:.2e}")
    return report


def _open_artifact(path: Path, provider: str, precision: str | None):
    """``(runner, prtool ONNX manifest, precision, backend description)`` for an engine or an ONNX file."""
    from prtool.deploy.engine_manifest import ENGINE_SUFFIXES

    if path.suffix in ENGINE_SUFFIXES:
        from prtool.deploy.trt import TensorRTRunner

        if precision is not None or provider != "cpu":
            raise PrtoolError("--precision and --provider apply to ONNX files; an engine runs on TensorRT at the "
                              "precision its manifest records")
        runner = TensorRTRunner(path)
        m = runner.manifest
        source = m["source_onnx"]["manifest"]
        if source is None:
            raise PrtoolError(f"engine {path} was built from an ONNX file without a prtool manifest: nothing to rebuild "
                              "the PyTorch encoder from")
        return runner, source, m["validation_preset"], f"TensorRT {m['tensorrt']} ({m['precision']}) on {m['gpu']['name']}"
    if path.suffix != ".onnx":
        raise PrtoolError(f"{path} is neither an ONNX file (.onnx) nor an engine ({', '.join(ENGINE_SUFFIXES)})")
    from prtool.deploy.ort_gpu import OrtRunner
    from prtool.manifest import checked_manifest

    if not path.is_file():
        raise PrtoolError(f"ONNX file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    manifest = checked_manifest(path)
    mixed = (manifest.get("mixed_precision") or {}).get("type")  # its own types decide: no provider lowering
    precision = precision or mixed or "fp32"
    runner = OrtRunner(path, provider, "fp32" if mixed else precision,
                       graph_optimization="ORT_ENABLE_EXTENDED" if mixed else None)  # see mixed_check
    return runner, manifest, precision, f"onnxruntime {', '.join(runner.providers)} ({precision})"


def validate_artifact(path: Path, provider: str = "cpu", precision: str | None = None, pretrained: str | None = None,
                      predictor: Path | None = None, images: Path | None = None, batch_size: int = 7,
                      tolerance_overrides: dict | None = None, tokens: Path | None = None) -> dict:
    """Validate an engine (.plan/.engine, on TensorRT) or an ONNX file (on ``provider``) against PyTorch.

    Tolerances are the artifact's precision preset, with ``tolerance_overrides`` (``atol``, ``rtol``,
    ``min_cosine``) replacing its fields. Returns the summary with the report under ``validation``.
    """
    from prtool.deploy.rebuild import rebuild_encoder
    from prtool.validate import check_graph, validation_images

    path = Path(path)
    if batch_size < 2:
        raise PrtoolError("validation needs --batch-size >= 2 to check batching")
    runner, manifest, precision, backend = _open_artifact(path, provider, precision)
    lo, hi = runner.batch_range
    if hi is not None and hi < 2:
        raise PrtoolError(f"the engine's profile allows batches {lo}..{hi}: validation needs batch 2; rebuild with "
                          "--max-batch >= 2")
    if hi is not None:
        batch_size = min(batch_size, hi)
    rebuilt = rebuild_encoder(manifest, pretrained, predictor, tokens)
    tol = replace(PRECISION_TOLERANCES[precision], **(tolerance_overrides or {}))
    pixels, source = validation_images(images, rebuilt.loaded.preprocess, batch_size)
    report = compare_runner(runner.infer, rebuilt.encoder, pixels, rebuilt.output_names, tol, batch_one=lo <= 1)
    if path.suffix == ".onnx":  # an engine's graph was checked when its ONNX was exported and built
        check_graph(report, path, rebuilt.encoder.expected_topk_nodes)
    report.images = source
    return {"artifact": str(path), "backend": backend, "precision": precision, "weights": rebuilt.weights,
            "schedule": manifest["schedule"]["string"] or "none", "passed": report.passed,
            "validation": report.to_dict()}
