"""Quantized variants as benchmark rows: ``bench accuracy --quantize`` and ``bench speed`` variants ``X+MODE``.

Each (method, schedule) is exported once in FP32 (with its kept indices) and quantized per mode
(``fp32`` = that FP32 export, unquantized, so the ONNX FP32 row is measured the same way). Accuracy
rows run in onnxruntime CPU over the whole dataset next to the FP32 PyTorch model, and report
top-1/top-5, the paired top-1 difference to the FP32 PyTorch row of the same method, the cosine to
its FP32 embedding, top-1 agreement with it, and the kept-patch set agreement with its kept indices.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError
from prtool.export.quantize import MODES, QuantizeOptions, calibration_batch, quantize_onnx, variant_name
from prtool.runtime.session import ort_session

log = logging.getLogger(__name__)

BENCH_MODES = ("fp32",) + MODES


def check_modes(modes: list[str], calib_data: str | None) -> None:
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad:
        raise PrtoolError(f"unknown --quantize {bad[0]!r}: use a comma-separated list of {', '.join(BENCH_MODES)}")
    if "int8-qdq" in modes and not calib_data:
        raise PrtoolError("--quantize int8-qdq needs --calib-data DATA (e.g. testbed) to calibrate activation scales")


def export_modes(loaded, spec, modes: list[str], workdir: Path, calib: dict | None, with_indices: bool = True) -> dict:
    """``{mode: onnx path}``: the FP32 export of ``spec`` once, then each mode quantized from it."""
    from prtool.export.onnx_export import ExportOptions, export_onnx

    workdir.mkdir(parents=True, exist_ok=True)
    stem = (spec.schedule.to_string() or "none").replace(":", "-").replace(",", "_") + f"-{spec.scorer}"
    fp32 = export_onnx(loaded, spec, workdir / f"{stem}.onnx",
                       ExportOptions(validate=False, with_kept_indices=with_indices)).onnx_path
    paths = {}
    for mode in modes:
        if mode == "fp32":
            paths[mode] = fp32
            continue
        cal = calib or {"data": None, "images": 64, "seed": 0}
        qopts = QuantizeOptions(mode, cal["data"] if mode == "int8-qdq" else None, calib_images=cal["images"],
                                calib_seed=cal["seed"])
        pixels = calibration_batch(loaded.preprocess, qopts)[0] if mode == "int8-qdq" else None
        paths[mode] = workdir / f"{stem}.{mode}.onnx"
        quantize_onnx(fp32, paths[mode], qopts, pixels)
    return paths


def check_variants(variants: list[str], backends: list[str], calib: dict | None) -> None:
    """``bench speed`` variants ``NAME+MODE``: known modes, CPU onnxruntime only, int8-qdq calibrated."""
    from prtool.export.quantize import split_variant

    modes = [m for m in (split_variant(v)[1] for v in variants) if m]
    if modes and set(backends) - {"onnxruntime"}:
        raise PrtoolError("quantized variants (NAME+MODE) run in onnxruntime CPU: pass --backends onnxruntime")
    check_modes(modes, (calib or {}).get("data"))


def export_variant(loaded, spec, name: str, workdir: Path, calib: dict | None) -> Path:
    """The ONNX of one ``bench speed`` variant (``NAME`` or ``NAME+MODE``), unvalidated, in ``workdir``."""
    from prtool.export.onnx_export import ExportOptions, export_onnx
    from prtool.export.quantize import split_variant

    mode = split_variant(name)[1]
    if mode is None:
        return export_onnx(loaded, spec, workdir / f"{name}.onnx", ExportOptions(validate=False)).onnx_path
    return export_modes(loaded, spec, [mode], workdir / name, calib, with_indices=False)[mode]


def _normed(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def evaluate_modes(encoder, paths: dict, dataset, class_emb: torch.Tensor, preprocess: dict, batch_size: int) -> dict:
    """Per mode: hits, top-5 hits, cosine and top-1 agreement to FP32 PyTorch, kept-set agreement (per image)."""
    w = class_emb.numpy().astype(np.float32)
    sessions = {m: ort_session(p) for m, p in paths.items()}
    acc = {m: {"hits": [], "top5": [], "cos": [], "agree": [], "kept": []} for m in paths}
    for pixels, labels, _ in dataset.batches(batch_size, preprocess):
        with torch.no_grad():
            ref_e, ref_idx = (t.numpy() for t in encoder(pixels.float()))
        ref_logits = _normed(ref_e) @ w.T
        for mode, sess in sessions.items():
            e, idx = sess.run(None, {"pixel_values": pixels.float().numpy()})[:2]
            logits = _normed(e) @ w.T
            a = acc[mode]
            a["hits"].append(logits.argmax(1) == labels)
            a["top5"].append((np.argsort(-logits, 1)[:, :5] == labels[:, None]).any(1))
            a["cos"].append((_normed(e) * _normed(ref_e)).sum(1))
            a["agree"].append(logits.argmax(1) == ref_logits.argmax(1))
            a["kept"].append([len(set(g) & set(r)) / len(r) for g, r in zip(idx.tolist(), ref_idx.tolist())])
    return {m: {k: np.concatenate([np.asarray(x) for x in v]) for k, v in a.items()} for m, a in acc.items()}


def quantized_rows(loaded, dataset, class_emb, spec, method: str, modes: list[str], ref_hits: np.ndarray,
                   workdir: Path, calib: dict | None, batch_size: int) -> list[tuple[dict, np.ndarray]]:
    """``[(row, per-image hits)]``, one per mode, for ``bench accuracy``."""
    from prtool.encoder.build import build_pruned_encoder
    from prtool.encoder.flops import encoder_cost
    from prtool.util.stats import paired_difference

    paths = export_modes(loaded, spec, modes, workdir, calib)
    encoder, _ = build_pruned_encoder(loaded, spec, normalize=True, return_indices=True)
    measured = evaluate_modes(encoder, paths, dataset, class_emb, loaded.preprocess, batch_size)
    cost = encoder_cost(encoder)
    out = []
    for mode, m in measured.items():
        diff, se = paired_difference(m["hits"], ref_hits)
        sched = spec.schedule
        row = {"method": variant_name(method, mode), "schedule": sched.to_string(), "keep": sched.final_keep,
               "keep_ratio": round(sched.final_keep / sched.num_patches, 3), "top1": 100.0 * m["hits"].mean(),
               "top5": 100.0 * m["top5"].mean(), "top1_stderr": None, "top1_per_seed": None, "seeds": None,
               "mean_cosine": None, "top1_agreement": None, "gflops": cost["gflops"],
               "tokens_per_block": cost["tokens_per_block"], "backend": "onnxruntime", "quantization": mode,
               "cosine_to_fp32": float(m["cos"].mean()), "min_cosine_to_fp32": float(m["cos"].min()),
               "top1_agreement_with_fp32": 100.0 * float(m["agree"].mean()),
               "kept_set_agreement_with_fp32": float(m["kept"].mean()),
               "min_kept_set_agreement_with_fp32": float(m["kept"].min()),
               "paired_vs": f"{method} (fp32 PyTorch)", "paired_diff": diff, "paired_se": se}
        out.append((row, m["hits"]))
    return out


def add_quantized_rows(result_rows: list, hits: dict, loaded, dataset, class_emb, schedules, methods: dict, modes,
                       predictor: Path | None, batch_size: int, calib: dict | None, workdir: Path) -> None:
    """Append the quantized rows of every pruned method (``methods``: name given -> ``prtool.encoder.methods`` entry)
    at every schedule."""
    from prtool.encoder.build import method_spec

    for sched in schedules:
        for method, entry in methods.items():
            spec = method_spec(entry, sched, predictor)
            log.info("%s at %s quantized: %s", method, sched.to_string(), ", ".join(modes))
            for row, h in quantized_rows(loaded, dataset, class_emb, spec, method, modes,
                                         hits[(method, sched.to_string())], workdir, calib, batch_size):
                result_rows.append(row)
                hits[(row["method"], sched.to_string())] = h


def quantized_markdown(result: dict) -> str:
    """The quantized rows' own table (appended to accuracy.md)."""
    rows = [r for r in result["rows"] if r.get("quantization")]
    if not rows:
        return ""
    head = ["variant", "schedule", "top-1 %", "Δ top-1 vs fp32 PyTorch (paired SE)", "cos to fp32 (min)",
            "top-1 agreement %", "kept-set agreement (min)"]
    lines = ["", "Quantized variants (onnxruntime CPU), each against the FP32 PyTorch model of its method:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], r["schedule"], f"{r['top1']:.2f}", f"{r['paired_diff']:+.2f} ± {r['paired_se']:.2f}",
            f"{r['cosine_to_fp32']:.5f} ({r['min_cosine_to_fp32']:.4f})", f"{r['top1_agreement_with_fp32']:.2f}",
            f"{r['kept_set_agreement_with_fp32']:.4f} ({r['min_kept_set_agreement_with_fp32']:.4f})"]) + " |")
    return "\n".join(lines) + "\n"
