"""Measure a mixed-precision ONNX against FP32 PyTorch on a labelled dataset, with its own tolerances.

``python -m prtool.deploy.mixed_check runs/x/model.fp16.onnx --data testbed`` rebuilds the FP32
encoder from the ONNX's manifest, runs both on every image (onnxruntime CPU for the ONNX) and
reports zero-shot top-1 of each, their top-1 agreement, the per-image embedding cosine and the
kept-patch set agreement, judged by :data:`prtool.export.validate.MIXED_TOLERANCES` (dataset-level criteria
for a reduced precision graph, beside the per-image presets ``prtool.export.validate.PRECISION_TOLERANCES``).

onnxruntime's CPU provider has few fp16 kernels: it runs most fp16 nodes in FP32 between inserted
casts, so this checks the graph's structure, its fp16 weights and the rounding at every cast, not
fp16 accumulation inside matrix products (that part needs TensorRT on a GPU). ``--runtime
reference`` runs the graph in ONNX's reference evaluator instead (numpy, every node in its own
dtype: closer to fp16 arithmetic, ~2 s per image on the testbed, so use ``--limit``).

Sessions on mixed graphs use ``ORT_ENABLE_EXTENDED`` (:func:`prtool.runtime.session.ort_session` sees the fp16
tensors): onnxruntime 1.32 CPU's NCHWc layout transformer (part of the default ``ORT_ENABLE_ALL``)
segfaults on AutoCast's fp16 testbed graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError
from prtool.export.io_names import PIXELS, as_tuple
from prtool.export.validate import MIXED_TOLERANCES, MixedTolerance


def _batch_figures(ref: list[np.ndarray], got: list[np.ndarray], class_emb: np.ndarray) -> dict:
    a, b = ref[0], got[0]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    out = {"cos": cos, "pred_ref": (a @ class_emb.T).argmax(-1), "pred_got": (b @ class_emb.T).argmax(-1)}
    if len(ref) > 1:
        out["kept"] = np.array([len(set(r.tolist()) & set(g.tolist())) / len(r) for r, g in zip(ref[1], got[1])])
    return out


class ReferenceRunner:
    """``infer`` through ``onnx.reference.ReferenceEvaluator`` (nodes computed in their graph dtypes)."""

    def __init__(self, path: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(path))
        self.outputs = [o.name for o in model.graph.output]
        self.evaluator = ReferenceEvaluator(model)

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.evaluator.run(None, {k: np.asarray(v) for k, v in feeds.items()})))


def measure_mixed(onnx_path: Path, data: str = "testbed", split: str = "test", batch_size: int = 64,
                  pretrained: str | None = None, predictor: Path | None = None, limit: int | None = None,
                  runtime: str = "onnxruntime") -> dict:
    from prtool.data.datasets import load_dataset
    from prtool.data.zeroshot import text_classifier
    from prtool.deploy.rebuild import rebuild_encoder
    from prtool.export.manifest import checked_manifest
    from prtool.runtime.session import OrtRunner

    onnx_path = Path(onnx_path)
    manifest = checked_manifest(onnx_path)  # refuses a missing manifest, or one of another graph, naming both
    if not manifest.get("mixed_precision"):
        raise PrtoolError(f"{onnx_path} has no mixed-precision manifest: "
                          "write it with `prtool build --mixed-onnx-only`")
    precision = manifest["mixed_precision"]["type"]
    rebuilt = rebuild_encoder(manifest, pretrained, predictor)
    dataset = load_dataset(data, split)
    if limit:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    class_emb = text_classifier(rebuilt.loaded, dataset).numpy().astype(np.float32)
    if runtime == "reference":
        runner = ReferenceRunner(onnx_path)
    elif runtime == "onnxruntime":
        runner = OrtRunner(onnx_path, "cpu", "fp32")
    else:
        raise PrtoolError(f"unknown runtime {runtime!r}: use onnxruntime or reference")
    figs: dict[str, list] = {}
    labels = []
    for pixels, y, _rows in dataset.batches(batch_size, rebuilt.loaded.preprocess):
        with torch.no_grad():
            ref = rebuilt.encoder(pixels.float())
        ref = [t.numpy() for t in as_tuple(ref)]
        out = runner.infer({PIXELS: pixels.numpy()})
        got = [out[n] for n in rebuilt.output_names]
        for k, v in _batch_figures(ref, got, class_emb).items():
            figs.setdefault(k, []).append(v)
        labels.append(np.asarray(y))
    f = {k: np.concatenate(v) for k, v in figs.items()}
    y = np.concatenate(labels)
    result = {"onnx": str(onnx_path), "precision": precision, "runtime": runtime, "images": int(len(y)),
              "data": f"{data}:{split}",
              "top1_fp32_torch": round(100 * float((f["pred_ref"] == y).mean()), 2),
              "top1_mixed_onnx": round(100 * float((f["pred_got"] == y).mean()), 2),
              "top1_agreement": round(float((f["pred_ref"] == f["pred_got"]).mean()), 4),
              "min_cosine": float(f["cos"].min()), "mean_cosine": float(f["cos"].mean()),
              "kept_set_agreement": float(f["kept"].mean()) if "kept" in f else None,
              "kept_sets_identical": float((f["kept"] == 1).mean()) if "kept" in f else None}
    return judge(result, MIXED_TOLERANCES[precision])


def judge(result: dict, tol: MixedTolerance) -> dict:
    """Add ``checks`` and ``passed`` to a :func:`measure_mixed` result under ``tol``."""
    drop = result["top1_fp32_torch"] - result["top1_mixed_onnx"]
    checks = [("top-1 agreement", result["top1_agreement"] >= tol.min_top1_agreement),
              ("top-1 drop (points)", drop <= tol.max_top1_drop),
              ("min cosine", result["min_cosine"] >= tol.min_cosine)]
    if result["kept_set_agreement"] is not None:
        checks.append(("kept-index set agreement", result["kept_set_agreement"] >= tol.min_kept_agreement))
    return {**result, "tolerances": asdict(tol), "checks": [{"check": c, "passed": ok} for c, ok in checks],
            "passed": all(ok for _, ok in checks)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prtool.deploy.mixed_check", description=__doc__.splitlines()[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--data", default="testbed")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pretrained")
    ap.add_argument("--predictor", type=Path)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "reference"))
    args = ap.parse_args(argv)
    try:
        result = measure_mixed(args.onnx, args.data, args.split, args.batch_size, args.pretrained, args.predictor,
                              args.limit, args.runtime)
    except PrtoolError as exc:
        print(f"prtool: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 2


if __name__ == "__main__":
    sys.exit(main())
