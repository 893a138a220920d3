"""The mixed-precision ONNX that TensorRT 11 (and 10 with ``--strongly-typed``) builds fp16/bf16 from.

TensorRT 11 has no weak typing: the types in the ONNX graph are the engine's types. prtool writes
that graph from its FP32 export with ModelOpt AutoCast (``modelopt.onnx.autocast``, NVIDIA's
route in the 10.x-to-11.x migration guide), keeping in FP32:

- ``LayerNormalization`` and ``Softmax`` (FP16 LayerNorm overflows on CLIP ViTs; off with
  ``fp32_norm=False``), ``ReduceL2`` (the output's L2 norm), ``TopK`` and ``ScatterElements``;
- the ranking scores: every node whose outputs feed only a TopK's scores input (the predictor,
  or CLS attention's scoring), found from the graph, not from node names;
- the index path: the integer nodes downstream of a TopK's indices, up to the gathers that take them.

:func:`fp32_plan` and :func:`check_mixed_graph` are pure graph functions (tested on CPU);
:func:`write_mixed_onnx` needs ``nvidia-modelopt`` (``pip install 'prtool[mixed]'``).
onnxruntime's CPU provider runs the result (its fp16 nodes partly through inserted casts), which
is how ``python -m prtool.export.mixed_precision`` measures it against PyTorch FP32 here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from prtool.errors import MissingDependencyError, PrtoolError

log = logging.getLogger(__name__)

NORM_OPS = ("LayerNormalization", "Softmax")
ALWAYS_FP32_OPS = ("TopK", "ReduceL2", "ScatterElements")
_FLOATS = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_LOW = {"fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16


def ensure_node_names(model) -> None:
    """Give every unnamed node a unique name (AutoCast and the plan select nodes by name)."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"prtool_node_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _consumers(model) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for node in model.graph.node:
        for i, t in enumerate(node.input):
            out.setdefault(t, []).append((node, i))
    return out


def scoring_nodes(model) -> list[str]:
    """Nodes whose outputs reach nothing but a TopK's scores input: the ranking scores' subgraph."""
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    topks = {id(n) for n in model.graph.node if n.op_type == "TopK"}
    keep: set[int] = set()

    def only_scores(node) -> bool:
        for t in node.output:
            if t in outputs or not consumers.get(t):
                return False
            if any(id(c) not in keep and not (id(c) in topks and i == 0) for c, i in consumers[t]):
                return False
        return True

    changed = True
    while changed:
        changed = False
        for node in reversed(model.graph.node):
            if id(node) not in keep and node.op_type not in ("TopK", "Constant") and only_scores(node):
                keep.add(id(node))
                changed = True
    return [n.name for n in model.graph.node if id(n) in keep]


def index_path_nodes(model) -> list[str]:
    """Integer nodes downstream of a TopK's indices (offsets, reshapes, slices): the index arithmetic.

    The walk stops at the first node with a float output: a gather taking the indices, or a Reshape
    whose shape was computed from them, is on the data path, not the index path.
    """
    consumers = _consumers(model)
    types = _tensor_types(model)
    seen: set[int] = set()
    names = []
    frontier = [n.output[1] for n in model.graph.node if n.op_type == "TopK" and len(n.output) > 1]
    while frontier:
        tensor = frontier.pop()
        for node, _ in consumers.get(tensor, []):
            if id(node) in seen or any(types.get(t) in _FLOATS for t in node.output):
                continue
            seen.add(id(node))
            names.append(node.name)
            frontier.extend(node.output)
    return names


def fp32_plan(model, fp32_norm: bool = True) -> dict:
    """``{"op_types": [...], "nodes": [...]}`` to keep in FP32 (names after :func:`ensure_node_names`)."""
    ensure_node_names(model)
    ops = (NORM_OPS if fp32_norm else ()) + ALWAYS_FP32_OPS
    nodes = list(dict.fromkeys(scoring_nodes(model) + index_path_nodes(model)))
    return {"op_types": list(ops), "nodes": nodes}


def _tensor_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def check_mixed_graph(model, plan: dict, precision: str) -> list[str]:
    """What a converted graph gets wrong: a node of the plan (or of its op types) computing in low precision,
    a TopK not scoring in FP32, or no node left in low precision at all."""
    low = _LOW[precision]
    types = _tensor_types(model)
    fp32_ops, fp32_nodes = set(plan["op_types"]), set(plan["nodes"])
    problems, lowered = [], 0
    for node in model.graph.node:
        io = [types.get(t) for t in list(node.input) + list(node.output) if t]
        if low in io and node.op_type != "Cast":
            lowered += 1
            if node.op_type in fp32_ops or node.name in fp32_nodes:
                problems.append(f"{node.op_type} {node.name} runs in {precision}")
    for node in model.graph.node:
        if node.op_type == "TopK" and types.get(node.input[0]) != 1:
            problems.append(f"TopK {node.name} ranks scores that are not float32")
    if not lowered:
        problems.append(f"no node runs in {precision}")
    return problems


def _autocast():
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.autocast.logging_config import configure_logging
    except ImportError as exc:
        raise MissingDependencyError(
            f"nvidia-modelopt's AutoCast is not importable ({exc}): it writes the mixed-precision ONNX that TensorRT "
            "11 builds fp16/bf16 engines from; pip install 'prtool[mixed]' (included in prtool[gpu])") from None
    configure_logging("ERROR")
    return convert_to_mixed_precision


def write_mixed_onnx(src: Path, dst: Path, precision: str = "fp16", fp32_norm: bool = True) -> dict:
    """Convert prtool's FP32 export ``src`` to ``dst`` (+ its manifest ``dst.json``), checked; returns the record."""
    import tempfile
    from importlib import metadata

    import onnx

    from prtool.export.manifest import checked_manifest, manifest_path_for
    from prtool.export.onnx_graph import load_onnx
    from prtool.util.files import sha256_file, write_json_atomic

    if precision not in _LOW:
        raise PrtoolError(f"a mixed-precision ONNX is fp16 or bf16, not {precision}")
    src, dst = Path(src), Path(dst)
    # the new manifest starts from the source's: refuse one that describes another graph (any ONNX builds,
    # so a source without a manifest is fine)
    manifest = checked_manifest(src) if manifest_path_for(src).is_file() else {}
    convert = _autocast()
    model = load_onnx(src)
    plan = fp32_plan(model, fp32_norm)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prtool-mixed-", dir=dst.parent) as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        mixed = convert(onnx_path=str(named), low_precision_type=precision, keep_io_types=True, providers=["cpu"],
                        nodes_to_exclude=["^" + re.escape(n) + "$" for n in plan["nodes"]],
                        op_types_to_exclude=plan["op_types"])
        problems = check_mixed_graph(mixed, plan, precision)
        if problems:
            raise PrtoolError(f"the mixed-precision graph of {src} is wrong: {problems[0]}"
                              f"{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; report this with the "
                              "ONNX")
        out = Path(tmp) / dst.name
        onnx.save(mixed, str(out))
        record = {"type": precision, "converter": f"modelopt.onnx.autocast {metadata.version('nvidia-modelopt')}",
                  "fp32_op_types": plan["op_types"], "fp32_nodes": len(plan["nodes"]),
                  "source_onnx": src.name, "source_sha256": manifest.get("onnx_sha256") or sha256_file(src)}
        manifest.update({"mixed_precision": record, "onnx_file": dst.name, "onnx_sha256": sha256_file(out)})
        write_json_atomic(dst.with_suffix(".json"), manifest)
        out.replace(dst)
    return record
