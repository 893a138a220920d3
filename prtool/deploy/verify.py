"""``prtool validate``: compare a deployed artifact (TensorRT engine or ONNX on a provider) with PyTorch.

The PyTorch encoder is rebuilt from the artifact's manifest (``prtool.deploy.rebuild``) and run
in FP32 on real images; the artifact, opened as a runner (:class:`~prtool.runtime.session.OrtRunner` or
:class:`~prtool.deploy.trt.TensorRTRunner`), goes through :func:`prtool.export.validate.compare`, the
same comparison as the export's own validation, under its precision's preset
(:data:`prtool.export.validate.PRECISION_TOLERANCES`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.export.validate import PRECISION_TOLERANCES, TorchRunner, ValidationReport, check_graph, compare


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
            raise PrtoolError(f"engine {path} was built from an ONNX file without a prtool manifest: nothing to "
                              "rebuild the PyTorch encoder from")
        backend = f"TensorRT {m['tensorrt']} ({m['precision']}) on {m['gpu']['name']}"
        return runner, source, m["validation_preset"], backend
    if path.suffix != ".onnx":
        raise PrtoolError(f"{path} is neither an ONNX file (.onnx) nor an engine ({', '.join(ENGINE_SUFFIXES)})")
    from prtool.export.manifest import checked_manifest
    from prtool.runtime.session import OrtRunner

    if not path.is_file():
        raise PrtoolError(f"ONNX file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    manifest = checked_manifest(path)
    mixed = (manifest.get("mixed_precision") or {}).get("type")  # its own types decide: no provider lowering
    precision = precision or mixed or "fp32"
    runner = OrtRunner(path, provider, "fp32" if mixed else precision)  # the factory picks the optimisation level
    return runner, manifest, precision, f"onnxruntime {', '.join(runner.providers)} ({precision})"


def validate_artifact(path: Path, provider: str = "cpu", precision: str | None = None, pretrained: str | None = None,
                      predictor: Path | None = None, images: Path | None = None, batch_size: int = 7,
                      tolerance_overrides: dict | None = None, tokens: Path | None = None,
                      allow_failed: bool = False) -> dict:
    """Validate an engine (.plan/.engine, on TensorRT) or an ONNX file (on ``provider``) against PyTorch.

    Tolerances are the artifact's precision preset, with ``tolerance_overrides`` (``atol``, ``rtol``,
    ``min_cosine``) replacing its fields. Returns the summary with the report under ``validation``;
    a failed validation raises :class:`~prtool.errors.ValidationError` unless ``allow_failed``.
    """
    from prtool.deploy.rebuild import rebuild_encoder
    from prtool.export.validate import validation_images

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
    quantized = (manifest.get("quantization") or {}).get("mode") if path.suffix == ".onnx" else None
    if quantized:
        precision = f"{quantized} (quantized)"
        report = _validate_quantized(path, rebuilt, quantized, images, batch_size, tolerance_overrides)
    else:
        tol = replace(PRECISION_TOLERANCES[precision], **(tolerance_overrides or {}))
        pixels, source = validation_images(images, rebuilt.loaded.preprocess, batch_size)
        report = ValidationReport(images=source)
        if path.suffix == ".onnx":  # an engine's graph was checked when its ONNX was exported and built
            check_graph(report, path, rebuilt.encoder.expected_topk_nodes)
        compare(runner, TorchRunner(rebuilt.encoder, rebuilt.output_names), pixels, tol, batch_one=lo <= 1,
                report=report)
    result = {"artifact": str(path), "backend": backend, "precision": precision, "weights": rebuilt.weights,
              "schedule": manifest["schedule"]["string"] or "none", "passed": report.passed,
              "validation": report.to_dict()}
    if not allow_failed:
        report.raise_if_failed(str(path), "--allow-failed-validation to exit 0", result)
    return result


def _validate_quantized(path: Path, rebuilt, mode: str, images, batch_size: int, overrides: dict | None):
    """A quantized export (its manifest records the mode) against the FP32 PyTorch encoder, under the mode's
    own preset (``prtool.export.quantize_check``), as its export validated it."""
    from prtool.export.quantize_check import validate_quantized

    if overrides:
        raise PrtoolError(f"{path} is a quantized export ({mode}): it is checked with its own preset "
                          "(cosine, top-1 and kept-set agreement); --atol/--rtol/--min-cosine apply to FP32/FP16 "
                          "artifacts: drop them")
    return validate_quantized(path, rebuilt.encoder, mode, images, batch_size, rebuilt.encoder.expected_topk_nodes,
                              rebuilt.loaded.preprocess)
