"""The compatibility matrix: which runtimes run which of prtool's exports, measured, not assumed.

Rows are export variants (unpruned, pruned with each gather mode, rank-and-merge; TorchScript
and dynamo exporters), columns are runtimes (onnxruntime CPU, the ONNX reference evaluator, OpenCV DNN,
Polygraphy's onnxrt runner, TensorRT where it exists). Every cell runs the export on real
images (shipped testbed eval canvases) in a child process, so a runtime that crashes marks its
cell instead of ending the run, and compares with PyTorch (FP32 tolerances).

    python -m prtool.deploy.compat --out export/compat

writes ``compat.json`` and ``COMPAT.md`` there (atomically). Random weights are fine here (the
question is op support and numerics, not accuracy); the untrained predictor is saved to a file
so the export and the PyTorch reference share its weights.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prtool.deploy.consumers import CONSUMERS
from prtool.export.io_names import EMBEDS, PIXELS

# Consumers outside Python (prtool.deploy.consumers) read image files, not pixels: their cells run
# on the same canvases written as PNG, preprocessed by the consumer itself.
RUNTIMES = ("onnxruntime-cpu", "onnx-reference", "opencv-dnn", "polygraphy-onnxrt", "tensorrt") + CONSUMERS
_MODULES = {"onnxruntime-cpu": "onnxruntime", "onnx-reference": "onnx", "opencv-dnn": "cv2",
            "polygraphy-onnxrt": "polygraphy", "tensorrt": "tensorrt", "cpp-onnxruntime": "export/cpp prtool-embed",
            "cpp-openvino": "export/cpp prtool-embed", "node-ort-web": "node + export/web modules",
            "chromium-ort-web": "chromium + export/web modules"}
# Runtimes that cannot import or convert the graph at all (measured here, 2026-12; shared/DEPLOY.md).
REFUSALS = (
    "Debian's OpenCV 4.6 (python3-opencv, bookworm): cannot import the graph (no TopK, no LayerNormalization); "
    "the opencv-dnn column is PyPI's OpenCV 5",
    "ncnn / pnnx: cannot convert the graph (TopK, Gather, GatherElements, ScatterElements unsupported)",
)
CELL_TIMEOUT_S = 300
GATHER_OPS = ("TopK", "Gather", "GatherElements", "GatherND")


@dataclass(frozen=True)
class Variant:
    name: str
    pruned: bool
    gather: str
    exporter: str
    scorer: str = "predictor"


VARIANTS = tuple(
    Variant(f"{'unpruned' if not pruned else 'pruned-' + gather}/{exporter}", pruned, gather, exporter)
    for exporter in ("torchscript", "dynamo")
    for pruned, gather in ((False, "flat"), (True, "flat"), (True, "elements"), (True, "nd"))
) + tuple(Variant(f"rank-merge-flat/{exporter}", True, "flat", exporter, "patch-ranking-merge")
          for exporter in ("torchscript", "dynamo"))


def _consumer_version(runtime: str) -> str | None:
    from prtool.deploy import consumers

    if runtime.startswith("cpp-"):
        if not consumers.CPP_BINARY.exists():
            return None
        proc = subprocess.run([str(consumers.CPP_BINARY), "--version"], capture_output=True, text=True)
        version = json.loads(proc.stdout).get(runtime[4:]) if proc.returncode == 0 else None
        return version.split("-")[0] if version else None  # OpenVINO's build number: 2026.4.1-22982-...
    package = consumers.WEB_DIR / "node_modules" / "onnxruntime-web" / "package.json"
    tool = consumers.chromium_path() if runtime.startswith("chromium") else shutil.which("node")
    return json.loads(package.read_text())["version"] if package.exists() and tool else None


def runtime_version(runtime: str) -> str | None:
    """The runtime's package version, or None when it is not installed."""
    import importlib

    if runtime in CONSUMERS:
        return _consumer_version(runtime)
    try:
        mod = importlib.import_module(_MODULES[runtime])
    except Exception:  # missing, or present but broken (CUDA libraries): either way not runnable
        return None
    return getattr(mod, "__version__", "unknown")


def run_runtime(runtime: str, onnx_path: Path, pixels: np.ndarray, workdir: Path) -> list[np.ndarray]:
    """The graph's outputs for ``pixels`` ``[B, 3, H, W]`` float32 on ``runtime`` (in this process)."""
    feed = {PIXELS: pixels}
    if runtime in CONSUMERS:
        from prtool.deploy.consumers import run_consumer

        return [run_consumer(runtime, onnx_path, sorted(workdir.glob("canvas_*.png")))[EMBEDS]]
    if runtime == "onnxruntime-cpu":
        from prtool.runtime.session import ort_session

        return ort_session(onnx_path).run(None, feed)
    if runtime == "onnx-reference":
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(str(onnx_path)).run(None, feed)
    if runtime == "opencv-dnn":
        import cv2

        net = cv2.dnn.readNetFromONNX(str(onnx_path))
        net.setInput(pixels)
        out = net.forward(net.getUnconnectedOutLayersNames())
        return [np.asarray(o) for o in out]
    if runtime == "polygraphy-onnxrt":
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        with OnnxrtRunner(SessionFromOnnx(str(onnx_path))) as runner:
            out = runner.infer(feed)
        return list(out.values())
    if runtime == "tensorrt":
        from prtool.deploy.build_config import resolve_build_config
        from prtool.deploy.trt import TensorRTRunner, build_engine

        plan = workdir / (onnx_path.stem + ".plan")
        b = pixels.shape[0]
        build_engine(resolve_build_config(onnx_path, "fp32", 1, b, b), plan)
        return list(TensorRTRunner(plan).infer(feed).values())
    raise ValueError(f"unknown runtime {runtime!r}")


def cell_main(argv: list[str]) -> int:
    """Child-process entry: ``RUNTIME ONNX PIXELS.npy WORKDIR OUT.npz``; exit 0 (outputs saved) or 3 (error on
    stdout)."""
    runtime, onnx_path, pixels_path, workdir, out = argv
    try:
        outputs = run_runtime(runtime, Path(onnx_path), np.load(pixels_path), Path(workdir))
    except Exception as exc:  # any failure of the runtime is the cell's result
        print(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}")
        return 3
    np.savez(out, *[np.asarray(o) for o in outputs])
    return 0


def run_isolated(runtime: str, onnx_path: Path, pixels_path: Path, workdir: Path,
                 timeout: float = CELL_TIMEOUT_S) -> tuple[str, object]:
    """``("ok", outputs)``, ``("error", message)`` or ``("crash", message)`` from a child process."""
    out = workdir / f"cell-{runtime}-{onnx_path.stem}.npz"
    out.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys; from prtool.deploy.compat import cell_main; sys.exit(cell_main(sys.argv[1:]))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, runtime, str(onnx_path), str(pixels_path), str(workdir),
                               str(out)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "crash", f"no answer within {timeout:.0f} s (killed)"
    if proc.returncode == 0 and out.exists():
        with np.load(out) as z:
            return "ok", [z[f"arr_{i}"] for i in range(len(z.files))]
    if proc.returncode == 3:
        return "error", proc.stdout.strip()
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return "crash", f"the process died ({how}){': ' + last[:200] if last else ''}"


def cell_result(status: str, payload, reference: np.ndarray, pixels: np.ndarray) -> dict:
    """A cell's verdict: the runtime's ``image_embeds`` through :func:`prtool.export.validate.compare` (FP32 preset)."""
    from prtool.export.validate import RecordedRunner, Tolerances, compare

    if status != "ok":
        return {"status": "crash" if status == "crash" else "error", "detail": str(payload)[:300]}
    got = RecordedRunner({EMBEDS: payload[0].astype(np.float32)}, pixels)
    report = compare(got, RecordedRunner({EMBEDS: reference}, pixels), pixels, Tolerances(), batch_one=False,
                     independence=False)
    (row,), (m,) = report.checks, report.metrics.values()
    if "max_abs" not in m:  # the shape row
        return {"status": "mismatch", "detail": row["detail"]}
    return {"status": "pass" if report.passed else "mismatch", "max_abs": m["max_abs"],
            "min_cosine": m["min_cosine"], "detail": f"max abs {m['max_abs']:.1e}, min cos {m['min_cosine']:.6f}"}


def _export_variant(loaded, variant: Variant, schedule, predictor: Path, workdir: Path):
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
    from prtool.export.onnx_export import ExportOptions, export_onnx
    from prtool.export.onnx_graph import load_onnx, op_histogram

    sched = schedule if variant.pruned else schedule_for(loaded, "none")
    spec = EncoderSpec(sched, variant.scorer, predictor if variant.pruned else None, variant.gather)
    path = workdir / (variant.name.replace("/", "-") + ".onnx")
    export_onnx(loaded, spec, path, ExportOptions(exporter=variant.exporter, validate=False))
    ops = op_histogram(load_onnx(path))
    encoder, _ = build_pruned_encoder(loaded, spec)
    return path, encoder, {op: ops[op] for op in GATHER_OPS if op in ops}


def _run_cell(runtime: str, version: str | None, path: Path, reference: np.ndarray, pixels: np.ndarray, work: Path,
              timeout: float) -> dict:
    """One cell: the export at ``path`` on ``runtime`` against the PyTorch ``reference``, or why it did not run."""
    import torch

    if version is None:
        hint = " (export/cpp/setup.sh, npm ci in export/web)" if runtime in CONSUMERS else ""
        return {"status": "not run", "detail": f"{_MODULES[runtime]} is not installed here{hint}"}
    if runtime == "tensorrt" and not torch.cuda.is_available():
        return {"status": "not run", "detail": "no CUDA GPU here"}
    status, payload = run_isolated(runtime, path, work / "pixels.npy", work, timeout)
    return cell_result(status, payload, reference, pixels)


def run_compat(loaded, schedule, variants=VARIANTS, runtimes=RUNTIMES, batch: int = 2, seed: int = 0,
               timeout: float = CELL_TIMEOUT_S, command: str = "") -> dict:
    """Export every variant of ``loaded`` and run it on every runtime; returns the matrix as a dict.

    ``command`` is the command line that regenerates the result (recorded in it).
    """
    import torch
    from PIL import Image

    from prtool.encoder.predictor import PredictorConfig, RankingPredictor, save_predictor
    from prtool.export.manifest import package_versions
    from prtool.export.validate import Tolerances, validation_images
    from prtool.testbed.eval_set import load_eval_canvases
    from prtool.util.seed import seed_everything

    versions = {r: runtime_version(r) for r in runtimes}
    pixels, images = validation_images(None, loaded.preprocess, batch)
    pixels = pixels.float().numpy()
    canvases = load_eval_canvases(limit=batch)[0] if set(runtimes) & set(CONSUMERS) else []
    rows, cells = [], {}
    with tempfile.TemporaryDirectory(prefix="prtool-compat-") as tmp:
        work = Path(tmp)
        seed_everything(seed)
        v = loaded.visual
        predictor = work / "predictor.safetensors"
        save_predictor(RankingPredictor(PredictorConfig(v.grid_size[0] * v.grid_size[1], v.class_embedding.shape[0])),
                       predictor, {"model_id": loaded.model_id, "rank_block": schedule.first_block})
        np.save(work / "pixels.npy", pixels)
        for i, canvas in enumerate(canvases):  # the same images, for the consumers that decode files
            Image.fromarray(canvas).save(work / f"canvas_{i:03d}.png")
        for variant in variants:
            row = {**asdict(variant)}
            cells[variant.name] = {}
            try:
                path, encoder, ops = _export_variant(loaded, variant, schedule, predictor, work)
            except Exception as exc:  # an exporter failure is a finding of the matrix, not a crash of it
                row["export"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
                continue
            row.update(export="ok", ops=ops)
            rows.append(row)
            with torch.no_grad():
                reference = encoder(torch.from_numpy(pixels)).numpy()
            cells[variant.name] = {r: _run_cell(r, versions[r], path, reference, pixels, work,
                                                timeout) for r in runtimes}
    tol = Tolerances()
    return {"command": command, "model": loaded.model_id, "schedule": schedule.to_string(), "keep": list(schedule.keep),
            "scorer": "predictor (untrained, seeded; weights saved and shared with the PyTorch reference)",
            "batch": batch, "images": images, "seed": seed,
            "tolerances": {"atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine},
            "environment": {"python": platform.python_version(), "platform": platform.platform(),
                            "packages": package_versions()},
            "runtimes": {r: {"package": _MODULES[r], "version": versions[r]} for r in runtimes},
            "variants": rows, "cells": cells}


_MARK = {"pass": "pass", "mismatch": "MISMATCH", "error": "FAIL", "crash": "CRASH", "not run": "not run"}


def matrix_markdown(result: dict) -> str:
    """``COMPAT.md``: the matrix, its setup, and every failure's message."""
    runtimes = list(result["runtimes"])
    head = [f"{r} {result['runtimes'][r]['version'] or '(not installed)'}" for r in runtimes]
    lines = ["# Runtime compatibility of prtool's ONNX exports", "",
             f"Generated by `{result['command']}`; do not edit by hand.", "",
             f"- model: `{result['model']['model']}` (weights: {result['model']['pretrained']}), "
             f"schedule `{result['schedule']}` (keep {result['keep']}), scorer: {result['scorer']}",
             f"- inputs: {result['images']}, batch {result['batch']}; each cell runs in its own process and is "
             f"compared with PyTorch FP32 (atol {result['tolerances']['atol']}, rtol {result['tolerances']['rtol']}, "
             f"min cosine {result['tolerances']['min_cosine']})",
             f"- machine: Python {result['environment']['python']}, {result['environment']['platform']}",
             "- `pass`: ran and matched; `MISMATCH`: ran, outside tolerance; `FAIL`: raised; `CRASH`: the process "
             "died or hung; `not run`: runtime absent here", "",
             "| variant | TopK/gather ops | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(runtimes)]
    for row in result["variants"]:
        ops = ", ".join(f"{k} x{v}" for k, v in row.get("ops", {}).items()) or "-"
        if row["export"] != "ok":
            lines.append(f"| {row['name']} | export {row['export']} |" + " - |" * len(runtimes))
            continue
        cell = result["cells"][row["name"]]
        marks = [_MARK[cell[r]["status"]] + (f" ({cell[r]['max_abs']:.0e})" if "max_abs" in cell[r] else "")
                 for r in runtimes]
        lines.append(f"| {row['name']} | {ops} | " + " | ".join(marks) + " |")
    failures = [(v, r, c) for v, row in result["cells"].items() for r, c in row.items()
                if c["status"] not in ("pass", "not run")]
    lines += ["", "Numbers in parentheses: max abs difference of `image_embeds` from PyTorch.", ""]
    if failures:
        lines += ["## Failures", ""] + [f"- {v} on {r}: {c['status']}: {c['detail']}" for v, r, c in failures] + [""]
    skipped = sorted({(r, c["detail"]) for row in result["cells"].values() for r, c in row.items()
                      if c["status"] == "not run"})
    if skipped:
        lines += ["## Not run", ""] + [f"- {r}: {d}" for r, d in skipped] + [""]
    lines += ["## Consumers outside Python", "",
              "`cpp-onnxruntime` and `cpp-openvino` are export/cpp's `prtool-embed` (ONNX Runtime C++ API; OpenVINO "
              "with FP32 forced); `node-ort-web` and `chromium-ort-web` are export/web's onnxruntime-web (WASM, one "
              "thread) under Node and in headless Chromium. They read the canvases as PNG files and preprocess them "
              "themselves (tests/test_consumers.py checks them on more images and exports).", "",
              "## Cannot run the graph", ""] + [f"- {r}" for r in REFUSALS] + [""]
    return "\n".join(lines)


def write_matrix(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``compat.json`` and ``COMPAT.md`` into ``out_dir``, each atomically."""
    from prtool.util.reports import write_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "compat.json", out_dir / "COMPAT.md"
    text = json.dumps(result, indent=2, default=str) + "\n"
    write_atomic(js, lambda p: p.write_text(text))
    write_atomic(md, lambda p: p.write_text(matrix_markdown(result)))
    return js, md


def generate_compat(out: Path = Path("export/compat"), model: str = "testbed", pretrained: str = "none",
                    keep_ratio: float = 0.6, stages: int = 4, runtimes: tuple[str, ...] = RUNTIMES, batch: int = 2,
                    seed: int = 0, command: str = "python -m prtool.deploy.compat") -> tuple[Path, Path]:
    """Measure the matrix for ``model`` (pruned variants keep ``keep_ratio`` of the patches in ``stages``)
    and write ``compat.json`` + ``COMPAT.md`` into ``out``; ``command`` regenerates it (recorded)."""
    from prtool.encoder.build import schedule_for
    from prtool.encoder.models import load_clip
    from prtool.errors import PrtoolError
    from prtool.util.seed import seed_everything

    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise PrtoolError(f"unknown runtimes {unknown}: choose from {', '.join(RUNTIMES)}")
    seed_everything(seed)
    loaded = load_clip(model, pretrained)
    schedule = schedule_for(loaded, keep_ratio=keep_ratio, stages=stages)
    result = run_compat(loaded, schedule, runtimes=tuple(runtimes), batch=batch, seed=seed, command=command)
    return write_matrix(result, out)


if __name__ == "__main__":
    from prtool.deploy.docgen import compat_main

    sys.exit(compat_main())
