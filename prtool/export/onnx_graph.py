"""Static facts about an ONNX graph: TopK nodes and their K, dynamic axes, op histogram, and a
TensorRT-readiness verdict computed without TensorRT."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from prtool.errors import PrtoolError

TRT_MIN_OPSET, TRT_MAX_OPSET = 9, 20  # TensorRT 10.0's ONNX parser: "opset 9 to opset 20"
TRT_MAX_TOPK = 3840

# Operators the TensorRT 10 ONNX parser imports (onnx-tensorrt docs/operators.md, TensorRT 10.x),
# restricted to the default ONNX domain. Kept conservative: ops listed there as unsupported are absent.
TRT10_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub
Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def load_onnx(path: Path):
    import onnx

    path = Path(path)
    if not path.exists():
        raise PrtoolError(f"ONNX file {path} does not exist")
    if path.is_dir():
        raise PrtoolError(f"{path} is a directory, not an ONNX file: pass the .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise PrtoolError(f"{path} is not a readable ONNX model ({type(exc).__name__}): re-export it") from None
    if not model.graph.node or not model.graph.input:  # protobuf parses an empty file (and some others) as a model
        what = "empty" if path.stat().st_size == 0 else "not an ONNX model (no graph)"
        raise PrtoolError(f"{path} is {what}: pass an .onnx file written by `prtool export` or another exporter")
    return model


def opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if not t.external_data}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_ints"):
                    out[node.output[0]] = np.array(attr.i if attr.name == "value_int" else list(attr.ints))
    return out


def topk_nodes(model) -> list[dict]:
    """Every TopK node with its K when K is a graph constant (``None`` when it is computed)."""
    consts = _constants(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "TopK":
            continue
        k = consts.get(node.input[1]) if len(node.input) > 1 else None
        k_val = int(np.asarray(k).reshape(-1)[0]) if k is not None and np.asarray(k).size == 1 else None
        attrs = {a.name: a.i for a in node.attribute}
        nodes.append({"name": node.name, "k": k_val, "constant_k": k_val is not None,
                      "sorted": bool(attrs.get("sorted", 1)), "largest": bool(attrs.get("largest", 1)),
                      "axis": int(attrs.get("axis", -1))})
    return nodes


def io_shapes(model) -> dict[str, list[dict]]:
    from onnx import TensorProto

    def describe(value):
        tt = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim]
        return {"name": value.name, "dtype": TensorProto.DataType.Name(tt.elem_type).lower(), "shape": dims}

    init = {t.name for t in model.graph.initializer}
    return {"inputs": [describe(v) for v in model.graph.input if v.name not in init],
            "outputs": [describe(v) for v in model.graph.output]}


def dynamic_axes(model) -> dict[str, list[int]]:
    """Axes that are not fixed integers, per graph input/output."""
    out = {}
    for group in io_shapes(model).values():
        for v in group:
            axes = [i for i, d in enumerate(v["shape"]) if not isinstance(d, int) or d <= 0]
            if axes:
                out[v["name"]] = axes
    return out


def op_histogram(model) -> dict[str, int]:
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def registry_plugins(model) -> list[dict]:
    """TensorRT registry plugins the graph needs: onnx-tensorrt imports ``ScatterElements`` with a
    reduction (ToMe's and every merge's) as the plugin "ScatterElements", which exists only after
    ``init_libnvinfer_plugins`` (prtool calls it; every other host must)."""
    out = []
    for node in model.graph.node:
        if node.op_type == "ScatterElements" and node.domain in ("", "ai.onnx"):
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                out.append({"node": node.name, "op": node.op_type, "reduction": reduction, "plugin": "ScatterElements"})
    return out


def trt_readiness(model) -> dict:
    """Checks a TensorRT 10/11 build would hit, computed from the graph alone (no TensorRT needed).

    ``ready`` can hold while ``plugins`` is non-empty: such a graph builds only where TensorRT's
    plugin library is initialised, which the ``registry plugins`` check states.
    """
    checks = []
    opset = opset_of(model)
    checks.append({"check": "opset in TensorRT 10 range", "passed": TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET,
                   "detail": f"opset {opset}, TensorRT 10.0 parses {TRT_MIN_OPSET}..{TRT_MAX_OPSET}"})
    tk = topk_nodes(model)
    bad_k = [t for t in tk if not t["constant_k"] or t["k"] > TRT_MAX_TOPK]
    checks.append({"check": f"TopK K constant and <= {TRT_MAX_TOPK}", "passed": not bad_k,
                   "detail": ", ".join(f"{t['name']}: K={t['k']}" for t in tk) or "no TopK"})
    dyn = dynamic_axes(model)
    extra = {name: axes for name, axes in dyn.items() if axes != [0]}
    checks.append({"check": "static shapes except batch", "passed": not extra,
                   "detail": "only axis 0 dynamic" if not extra else f"other dynamic axes: {extra}"})
    unsupported = sorted({op for op in op_histogram(model) if op not in TRT10_OPS})
    checks.append({"check": "every op in TensorRT 10's ONNX operator list", "passed": not unsupported,
                   "detail": "all supported" if not unsupported else f"unsupported: {', '.join(unsupported)}"})
    plugins = registry_plugins(model)
    names = sorted({p["plugin"] for p in plugins})
    checks.append({"check": "registry plugins", "passed": True,
                   "detail": "none needed" if not plugins else
                   f"needs TensorRT plugin(s) {', '.join(names)} ({len(plugins)} ScatterElements with a reduction): "
                   "init_libnvinfer_plugins before parsing or deserialising (prtool does; every other host must)"})
    ready = all(c["passed"] for c in checks)
    verdict = ("ready" + (f", with TensorRT plugin {', '.join(names)}" if names else "")) if ready else "NOT ready"
    return {"ready": ready, "verdict": verdict, "plugins": plugins, "checks": checks}


def inspect_onnx(path: Path) -> dict:
    """Everything ``prtool inspect`` reports about one ONNX file."""
    from prtool.export.manifest import read_manifest_for

    model = load_onnx(path)
    return {
        "path": str(path),
        "ir_version": int(model.ir_version),
        "opset": opset_of(model),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        **io_shapes(model),
        "dynamic_axes": dynamic_axes(model),
        "topk": topk_nodes(model),
        "op_histogram": op_histogram(model),
        "num_nodes": len(model.graph.node),
        "tensorrt_readiness": trt_readiness(model),
        "manifest": read_manifest_for(path),
    }
