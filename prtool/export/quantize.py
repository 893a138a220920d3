"""Quantized exports: INT8 (dynamic, or calibrated static Q/DQ) and FP16, composed with pruning.

``quantize_onnx(src, dst, options, calib)`` turns prtool's FP32 export into a quantized graph with
onnxruntime's quantization tools (INT8) or the mixed-precision writer of
:mod:`prtool.export.mixed_precision` (FP16, ModelOpt AutoCast). What is never quantized, in every
mode, is found from the graph (not from node names):

- the ranking scores (the predictor, or CLS attention's scoring): :func:`scoring_nodes`;
- every TopK, and the index arithmetic downstream of its indices: :func:`index_path_nodes`;
- every gather (``Gather``, ``GatherElements``, ``GatherND``) and the merges' ``ScatterElements``.

Only ``MatMul``/``Gemm`` (and the patch embedding ``Conv`` in Q/DQ) are quantized: LayerNorm,
Softmax, GELU and the residual adds stay FP32 (see benchmarks/README.md for the measured reason).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prtool.errors import PrtoolError

log = logging.getLogger(__name__)

MODES = ("int8-dynamic", "int8-qdq", "fp16")
INT8_OPS = {"int8-dynamic": ("MatMul", "Gemm"), "int8-qdq": ("MatMul", "Gemm", "Conv")}
NEVER_OPS = ("TopK", "Gather", "GatherElements", "GatherND", "ScatterElements")


@dataclass(frozen=True)
class QuantizeOptions:
    """``prtool export --quantize MODE`` (``--calib-*`` only for ``int8-qdq``)."""

    mode: str
    calib_data: str | None = None
    calib_split: str = "train"
    calib_images: int = 64
    calib_seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise PrtoolError(f"unknown --quantize {self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode == "int8-qdq" and not self.calib_data:
            raise PrtoolError("--quantize int8-qdq needs --calib-data DATA (e.g. testbed, or an image-folder dataset) "
                              "to calibrate its activation scales")
        if self.mode != "int8-qdq" and self.calib_data:
            raise PrtoolError(f"--calib-data calibrates int8-qdq only; --quantize {self.mode} takes none: drop it")
        if self.calib_images < 1:
            raise PrtoolError(f"--calib-images {self.calib_images} must be at least 1")


def calibration_batch(preprocess: dict, options: QuantizeOptions):
    """``(pixels [N,3,H,W] float32, record)``: N images of ``--calib-data``, drawn with ``--calib-seed``.

    The record's ``sha256`` is the fingerprint of the preprocessed batch itself."""
    from prtool.data.datasets import load_dataset

    try:
        dataset = load_dataset(options.calib_data, options.calib_split)
    except PrtoolError as exc:
        raise PrtoolError(f"--calib-data: {exc} (--calib-split picks the split)") from None
    if options.calib_images > len(dataset):
        raise PrtoolError(f"--calib-images {options.calib_images} exceeds the {len(dataset)} images of "
                          f"{options.calib_data} ({options.calib_split}): pass at most {len(dataset)}")
    rows = np.sort(np.random.default_rng(options.calib_seed).permutation(len(dataset))[: options.calib_images])
    pixels, _, loaded = dataset.load(rows, preprocess)
    pixels = pixels.float().contiguous().numpy()
    record = {"dataset": options.calib_data, "split": options.calib_split, "images": int(len(loaded)),
              "seed": options.calib_seed, "sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    return pixels, record


class BatchReader:
    """onnxruntime's ``CalibrationDataReader`` over a fixed batch, ``batch`` images per call."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int = 8):
        self.feeds = [{input_name: pixels[i : i + batch]} for i in range(0, len(pixels), batch)]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


def never_quantized(model) -> list[str]:
    """Names of the nodes no mode may quantize: scoring subgraph, TopK, index path, gathers, scatters."""
    from prtool.export.mixed_precision import ensure_node_names, index_path_nodes, scoring_nodes

    ensure_node_names(model)
    ops = [n.name for n in model.graph.node if n.op_type in NEVER_OPS]
    return list(dict.fromkeys(scoring_nodes(model) + index_path_nodes(model) + ops))


def activation_matmuls(model) -> list[str]:
    """MatMuls of two activations (attention's ``Q K^T`` and ``softmax V``): neither input derives from weights."""
    consts = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # weights reach a MatMul through Constant/Transpose/Reshape/Cast only
        if node.op_type == "Constant" or (node.op_type in ("Transpose", "Reshape", "Cast", "Identity")
                                          and node.input and node.input[0] in consts):
            consts.update(node.output)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & consts]


def exclusion_plan(model, mode: str, extra_nodes: tuple[str, ...] = ()) -> dict:
    """``{"op_types": quantized op types, "nodes": excluded node names}`` for an INT8 ``mode``.

    int8-qdq also keeps the attention MatMuls in FP32: with them quantized (per-tensor, MinMax) the
    testbed's top-1 agreement with FP32 fell to 91.3% (cosine 0.9961) on 300 eval images, 99.3% (0.99975)
    without (benchmarks/README.md). Dynamic INT8 quantizes weight MatMuls only, by construction."""
    extra = activation_matmuls(model) if mode == "int8-qdq" else []
    return {"op_types": list(INT8_OPS[mode]), "nodes": never_quantized(model) + extra + list(extra_nodes)}


def _quantize_int8(named: Path, out: Path, mode: str, plan: dict, calib: np.ndarray | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    common = {"op_types_to_quantize": plan["op_types"], "nodes_to_exclude": plan["nodes"]}
    if mode == "int8-dynamic":
        quantize_dynamic(str(named), str(out), weight_type=QuantType.QInt8, per_channel=False, **common)
        return
    reader = BatchReader("pixel_values", calib)
    quantize_static(str(named), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True},
                    **common)


def quantize_onnx(src: Path, dst: Path, options: QuantizeOptions, calib: np.ndarray | None = None,
                  extra_nodes: tuple[str, ...] = ()) -> dict:
    """Write the ``options.mode`` graph of FP32 ``src`` to ``dst``; returns the manifest's quantization record.

    ``calib`` (``[N,3,H,W]``) calibrates int8-qdq. ``extra_nodes`` are excluded on top of the plan."""
    import tempfile

    import onnx

    from prtool.export.onnx_graph import load_onnx
    from prtool.export.quantize_check import check_quantized_graph

    options.check()
    src, dst = Path(src), Path(dst)
    if options.mode == "fp16":
        return _fp16(src, dst)
    model = load_onnx(src)
    never = never_quantized(model)  # checked below against the graph, independently of the plan
    plan = exclusion_plan(model, options.mode, extra_nodes)
    with tempfile.TemporaryDirectory(prefix=".prtool-quant-", dir=dst.parent) as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        _quantize_int8(named, dst, options.mode, plan, calib)
    problems = check_quantized_graph(load_onnx(dst), never)
    if problems:
        dst.unlink(missing_ok=True)
        raise PrtoolError(f"the {options.mode} graph of {src} is wrong: {problems[0]}"
                          f"{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; report this with the ONNX")
    return {"mode": options.mode, "tool": f"onnxruntime.quantization {_version('onnxruntime')}",
            "quantized_op_types": plan["op_types"], "excluded_nodes": len(plan["nodes"]),
            "excluded": "scoring subgraph, TopK, index path, Gather/GatherElements/GatherND, ScatterElements"
            + (", attention MatMuls (activation x activation)" if options.mode == "int8-qdq" else ""),
            "weights": "int8 symmetric" + (", per channel" if options.mode == "int8-qdq" else ", per tensor"),
            "activations": "int8 per tensor, scale per batch at run time" if options.mode == "int8-dynamic"
            else "int8 symmetric per tensor, MinMax-calibrated (static)"}


def _fp16(src: Path, dst: Path) -> dict:
    """FP16 through :func:`prtool.export.mixed_precision.write_mixed_onnx` (it writes ``dst`` and its manifest)."""
    from prtool.export.mixed_precision import write_mixed_onnx

    record = write_mixed_onnx(src, dst, "fp16")
    dst.with_suffix(".json").unlink(missing_ok=True)  # the caller writes the export's manifest
    return {"mode": "fp16", "tool": record["converter"], "fp32_op_types": record["fp32_op_types"],
            "excluded_nodes": record["fp32_nodes"],
            "excluded": "LayerNorm, Softmax, ReduceL2, TopK, ScatterElements, scoring subgraph, index path (FP32)"}


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


def variant_name(method: str, mode: str | None) -> str:
    """``patch-ranking-merge+int8-qdq``: how benchmarks name a quantized variant."""
    return f"{method}+{mode}" if mode else method


def split_variant(name: str) -> tuple[str, str | None]:
    """``"patch-ranking+int8-dynamic"`` -> ``("patch-ranking", "int8-dynamic")``; unknown modes are refused."""
    method, _, mode = name.partition("+")
    if mode and mode not in MODES:
        raise PrtoolError(f"variant {name!r}: unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    return method, mode or None


def export_quantized(loaded, spec, out: Path, options, qopts: QuantizeOptions, **export_kw):
    """``prtool export --quantize``: the FP32 export (validated as always), quantized, validated against FP32
    PyTorch with the quantized preset, and its manifest; nothing appears at ``out`` unless all of it succeeded."""
    import shutil

    from prtool.export.artifacts import staged_outputs
    from prtool.export.onnx_export import ExportResult, export_onnx, refuse_failed_export
    from prtool.export.quantize_check import validate_quantized
    from prtool.util.files import sha256_file, write_json_atomic

    qopts.check()
    out = Path(out)
    calib, calib_record = calibration_batch(loaded.preprocess, qopts) if qopts.mode == "int8-qdq" else (None, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_outputs(out) as tmpdir:
        (tmpdir / "fp32").mkdir()
        fp32 = export_onnx(loaded, spec, tmpdir / "fp32" / out.name, options, **export_kw)
        tmp_q = tmpdir / out.name
        record = quantize_onnx(fp32.onnx_path, tmp_q, qopts, calib)
        record.update({"calibration": calib_record, "fp32_onnx_sha256": fp32.manifest["onnx_sha256"]})
        report = None
        if options.validate:
            report = validate_quantized(tmp_q, fp32.encoder, qopts.mode, options.images, options.batch_size,
                                        getattr(fp32.encoder, "expected_topk_nodes", None), loaded.preprocess)
            if not options.allow_failed_validation:
                refuse_failed_export(report, spec, f"the {qopts.mode} export")
        manifest = {**fp32.manifest, "quantization": record, "onnx_sha256": sha256_file(tmp_q),
                    "onnx_file": out.name, "fp32_validation": fp32.manifest["validation"],
                    "validation": report.to_dict() if report is not None else None}
        write_json_atomic(tmpdir / out.with_suffix(".json").name, manifest)
        shutil.rmtree(tmpdir / "fp32")
    return ExportResult(out, out.with_suffix(".json"), manifest, report, fp32.encoder)


def trt_precision(model, precision: str | None) -> str | None:
    """TensorRT's precision for a quantized graph: ``"graph"`` (strongly typed, explicit quantization from its
    Q/DQ nodes, no calibrator, no precision flags) for Q/DQ; ``None`` for a graph without quantization."""
    ops = {n.op_type for n in model.graph.node}
    if ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
        raise PrtoolError("this is an int8-dynamic export (onnxruntime's integer ops, for CPUs): TensorRT builds "
                          "INT8 from Q/DQ graphs; export with --quantize int8-qdq --calib-data DATA")
    if not ops & {"QuantizeLinear", "DequantizeLinear"}:
        return None
    if precision not in (None, "graph"):
        raise PrtoolError(f"the ONNX holds Q/DQ nodes (explicit INT8 quantization): build it without --precision "
                          f"{precision}; TensorRT takes the types from the graph")
    return "graph"


def describe(record: dict) -> str:
    """One line for ``prtool inspect``: the quantization and its calibration set."""
    line = f"quantization: {record['mode']} ({record['tool']}), {record['excluded_nodes']} nodes kept exact"
    cal = record.get("calibration")
    if cal:
        line += (f"; calibrated on {cal['dataset']}/{cal['split']}, {cal['images']} images, seed {cal['seed']}, "
                 f"batch sha256 {cal['sha256'][:16]}")
    return line
