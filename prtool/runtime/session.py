"""The one onnxruntime session factory, and the runner every graph check and benchmark feeds.

:func:`ort_session` is the only place prtool opens an ``InferenceSession``: validation, the
demo, evaluation, benchmarks, the text export, the compatibility matrix and the GPU providers
all get their sessions here, so they share three choices:

- idle intra-op threads sleep instead of spinning. prtool keeps several sessions alive and runs
  them in turn (interleaved timing, validation): with spinning on, the threads of the session that
  just ran keep 2 cores busy while the next one runs, which made a 5-variant demo report 1.14x
  where the same graphs run 1.33x apart;
- the graph optimisation level fits the graph: onnxruntime's default ``ORT_ENABLE_ALL`` for FP32
  graphs, ``ORT_ENABLE_EXTENDED`` for graphs holding fp16/bf16 tensors (onnxruntime 1.32 CPU's
  NCHWc layout transformer, part of ``ENABLE_ALL``, segfaults on AutoCast's fp16 testbed graph);
- a GPU provider is refused, not silently replaced by the CPU (``prtool.runtime.ort_gpu``).

:class:`OrtRunner` wraps a session in the runner interface ``infer(feeds) -> outputs``
(``{input name: array}`` in, ``{output name: array}`` out) that :func:`prtool.export.validate.compare`
takes, as do the TensorRT runner and the consumers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prtool.errors import require

EXTENDED = "ORT_ENABLE_EXTENDED"
REDUCED_TYPES = (10, 16)  # onnx.TensorProto.FLOAT16, BFLOAT16


def holds_reduced_precision(path: Path) -> bool:
    """Whether the graph has fp16/bf16 weights or casts to them (a mixed-precision graph)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(t.data_type in REDUCED_TYPES for t in graph.initializer):
        return True
    return any(a.name == "to" and a.i in REDUCED_TYPES for n in graph.node if n.op_type == "Cast" for a in n.attribute)


def optimization_level(path: Path, requested: str | None = None) -> str | None:
    """The ``ort.GraphOptimizationLevel`` name to set, or None for onnxruntime's default (ENABLE_ALL)."""
    if requested is not None:
        return requested
    return EXTENDED if holds_reduced_precision(path) else None


def ort_session(path: Path, provider: str = "cpu", precision: str = "fp32", profile=None, fp32_norm: bool = True,
                cache_dir: Path | None = None, optimization: str | None = None):
    """An ``InferenceSession`` on ``provider`` (cpu, cuda, tensorrt): quiet, non-spinning, checked.

    ``optimization`` names an ``ort.GraphOptimizationLevel`` (default: :func:`optimization_level`'s
    choice for the graph). For GPU providers, ``precision``, ``profile``, ``fp32_norm`` and
    ``cache_dir`` become the provider options (``prtool.runtime.ort_gpu.provider_options``), and a
    session that fell back to another provider is refused.
    """
    from prtool.runtime.ort_gpu import check_precision, check_providers, gpu_providers

    check_precision(provider, precision)
    ort = require("onnxruntime", "gpu" if provider != "cpu" else None, f"running ONNX on {provider}")
    if provider == "cpu":
        providers, check = [("CPUExecutionProvider", {})], None
    else:
        providers = gpu_providers(ort, provider, precision, profile, fp32_norm, cache_dir)
        check = check_providers
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    level = optimization_level(path, optimization)
    if level is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(str(path), so, providers=providers)
    if check is not None:
        check(provider, session)
    return session


class OrtRunner:
    """``infer({input name: array}) -> {output name: np.ndarray}`` on an :func:`ort_session`."""

    def __init__(self, path: Path, provider: str = "cpu", precision: str = "fp32", profile=None,
                 fp32_norm: bool = True, cache_dir: Path | None = None, optimization: str | None = None):
        self.session = ort_session(path, provider, precision, profile, fp32_norm, cache_dir, optimization)
        self.providers = list(self.session.get_providers())
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batch_range = (1, None)

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in feeds.items()}
        arrays = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        return dict(zip(self.outputs, self.session.run(None, arrays), strict=True))
