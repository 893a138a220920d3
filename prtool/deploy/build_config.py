"""The TensorRT engine build configuration, resolved from an ONNX file without TensorRT.

``resolve_build_config(...)`` reads the ONNX graph (input name and static dims, the
LayerNormalization/Softmax nodes), checks the user's choices and returns a frozen
:class:`BuildConfig`. The same object drives the Python build (``prtool.deploy.trt``) and
``trtexec_command`` (what ``prtool build --dry-run`` prints), so both always agree.

Precision choices (what each means per TensorRT major: :mod:`prtool.runtime.trt_version`):

- ``fp32``: FP32 only; TF32 is switched off so "fp32" means FP32 (``--noTF32``).
- ``fp16`` / ``bf16``: on TensorRT 11 (and on 10 with ``--strongly-typed``) prtool writes a
  mixed-precision ONNX beside the engine (LayerNorm, Softmax, the ranking scores and the index path
  kept in FP32: :mod:`prtool.export.mixed_precision`) and TensorRT builds it as typed. On 10
  without ``--strongly-typed`` the builder may pick that type (weak typing, deprecated in 10.12),
  with LayerNorm/Softmax pinned to FP32 through ``OBEY_PRECISION_CONSTRAINTS`` unless
  ``fp32_norm`` is off: FP16 LayerNorm overflows on CLIP ViTs.
- ``best`` (TensorRT 10, weakly typed only): FP16 and BF16 together (and TF32). Unlike
  ``trtexec --best`` it does not enable INT8/FP8: quantized ViTs must be measured, not assumed.
- ``--strongly-typed`` without ``--precision`` (or an ONNX that already holds FP16/BF16): the
  graph's own types decide (``precision = "graph"``).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.runtime.trt_version import (  # noqa: F401 - trtexec_command is re-exported
    DEFAULT_MAJOR,
    builder_flags,
    check_precision,
    installed_tensorrt,
    network_flags,
    pins_layers,
    resolve_major,
    trtexec_command,
    uses_mixed_onnx,
    weakly_typed,
)

PRECISIONS = ("fp32", "fp16", "bf16", "best")
DEFAULT_PRECISION = "fp16"
FP32_OPS = ("LayerNormalization", "Softmax")
_FLOAT_TYPES = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "DOUBLE": "fp64"}


@dataclass(frozen=True)
class Profile:
    """One optimization profile: only the batch axis varies; ``dims`` are the static ``[C, H, W]``."""

    input_name: str
    dims: tuple[int, ...]
    min_batch: int
    opt_batch: int
    max_batch: int

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"min": self.shape(self.min_batch), "opt": self.shape(self.opt_batch), "max": self.shape(self.max_batch)}

    def trtexec_spec(self, batch: int) -> str:
        """``pixel_values:8x3x224x224``."""
        return f"{self.input_name}:" + "x".join(str(d) for d in self.shape(batch))

    def to_dict(self) -> dict:
        return {"input": self.input_name, **{k: list(v) for k, v in self.shapes().items()}}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides an engine; recorded in its manifest."""

    onnx: Path
    onnx_sha256: str
    profile: Profile
    precision: str  # fp32 | fp16 | bf16 | best | graph (strongly typed)
    graph_float_types: tuple[str, ...]
    strongly_typed: bool
    fp32_norm: bool  # effective: LayerNorm/Softmax kept in FP32 (pinned, or kept so in the mixed ONNX)
    fp32_layer_patterns: tuple[str, ...] | None  # trtexec layer-name patterns; None = cannot be named
    workspace_mib: int | None
    timing_cache: Path | None
    trt_major: int = DEFAULT_MAJOR
    mixed_onnx: Path | None = None  # the mixed-precision ONNX prtool writes and TensorRT builds (fp16/bf16 typed)
    notes: tuple[str, ...] = field(default=())

    @property
    def build_onnx(self) -> Path:
        """The ONNX file TensorRT parses."""
        return self.mixed_onnx or self.onnx

    @property
    def enabled_types(self) -> tuple[str, ...]:
        """Builder flags to set (``trt.BuilderFlag`` names) for ``trt_major``."""
        return builder_flags(self)

    @property
    def tf32(self) -> bool:
        """TF32 stays on (TensorRT's default) except for FP32 engines, where "fp32" means FP32."""
        if self.precision == "graph":
            return set(self.graph_float_types) != {"fp32"}
        return self.precision != "fp32"

    @property
    def tolerance_key(self) -> str:
        """Which validation preset fits this engine (``prtool.deploy.verify.PRECISION_TOLERANCES``)."""
        if self.precision != "graph":
            return self.precision
        types = set(self.graph_float_types)
        return "fp16" if "fp16" in types else ("bf16" if "bf16" in types else "fp32")

    def to_dict(self) -> dict:
        return {"onnx": str(self.onnx), "onnx_sha256": self.onnx_sha256, "profile": self.profile.to_dict(),
                "precision": self.precision, "graph_float_types": list(self.graph_float_types),
                "strongly_typed": self.strongly_typed or self.trt_major >= 11, "tensorrt_major": self.trt_major,
                "mixed_onnx": str(self.mixed_onnx) if self.mixed_onnx else None,
                "builder_flags": list(self.enabled_types), "network_flags": list(network_flags(self)),
                "tf32": self.tf32,
                "fp32_norm": self.fp32_norm, "precision_constraints": "obey" if pins_layers(self) else "none",
                "fp32_layer_patterns": None if self.fp32_layer_patterns is None else list(self.fp32_layer_patterns),
                "workspace_mib": self.workspace_mib,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None, "notes": list(self.notes)}


def graph_float_types(model) -> tuple[str, ...]:
    """Float types of the graph's initializers, inputs and outputs (``("fp32",)`` for prtool exports)."""
    from onnx import TensorProto

    codes = {t.data_type for t in model.graph.initializer}
    codes |= {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    names = {TensorProto.DataType.Name(c) for c in codes if c}
    return tuple(sorted(_FLOAT_TYPES[n] for n in names if n in _FLOAT_TYPES))


def fp32_layer_patterns(model) -> tuple[str, ...] | None:
    """trtexec ``--layerPrecisions`` name patterns for every LayerNormalization/Softmax node.

    TensorRT's ONNX parser names each layer after its ONNX node, so a node name selects the layer.
    Per op a single-wildcard pattern is used when it matches exactly that op's nodes (``*/Softmax``
    for TorchScript exports, ``node_layer_norm*`` for dynamo ones), else the exact names. ``None``
    when a node is unnamed or a name holds ``,`` or ``:`` (trtexec's separators): trtexec then cannot
    select the layers, and only the Python build (which selects them by layer type) pins them.
    """
    nodes = [(n.op_type, n.name) for n in model.graph.node]
    patterns: list[str] = []
    for op in FP32_OPS:
        names = [name for t, name in nodes if t == op]
        if not names:
            continue
        if any(not n or "," in n or ":" in n for n in names):
            return None
        others = [name for t, name in nodes if t != op]
        suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
        prefix = os.path.commonprefix(names)
        if suffix and not any(o.endswith(suffix) for o in others):
            patterns.append("*" + suffix)
        elif prefix and not any(o.startswith(prefix) for o in others):
            patterns.append(prefix + "*")
        else:
            patterns.extend(names)
    return tuple(patterns)


def _input_profile(model, path: Path, min_batch: int, opt_batch: int, max_batch: int) -> Profile:
    from prtool.export.onnx_graph import io_shapes

    inputs = io_shapes(model)["inputs"]
    if len(inputs) != 1:
        raise PrtoolError(f"{path} has {len(inputs)} inputs ({[i['name'] for i in inputs]}): prtool builds "
                          "single-input image encoders (pixel_values)")
    name, shape = inputs[0]["name"], inputs[0]["shape"]
    rest = shape[1:]
    if not rest or not all(isinstance(d, int) and d > 0 for d in rest):
        raise PrtoolError(f"input {name} of {path} has shape {shape}: every axis but the batch must be static; "
                          "re-export it with `prtool export`")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise PrtoolError(f"batch profile {min_batch}/{opt_batch}/{max_batch} must satisfy "
                          "1 <= --min-batch <= --opt-batch <= --max-batch")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if fixed is not None and not min_batch == opt_batch == max_batch == fixed:
        raise PrtoolError(f"{path} fixes the batch of {name} at {fixed}: pass --min-batch/--opt-batch/--max-batch "
                          f"{fixed}, or re-export with a dynamic batch")
    return Profile(name, tuple(int(d) for d in rest), min_batch, opt_batch, max_batch)


def mixed_onnx_path(onnx_path: Path, precision: str, engine: Path | None = None) -> Path:
    """Where prtool writes the mixed-precision ONNX: beside the engine (``model.fp16.onnx``), else the source."""
    base = Path(engine) if engine is not None else Path(onnx_path)
    return base.with_name(f"{base.name.split('.')[0]}.{precision}.onnx")


def _resolve_precision(precision: str | None, strongly_typed: bool, types: tuple[str, ...], major: int) -> str:
    if precision is None:
        if strongly_typed or set(types) & {"fp16", "bf16"}:
            return "graph"  # the graph's own types decide
        precision = DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise PrtoolError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if set(types) & {"fp16", "bf16"}:
        raise PrtoolError(f"the ONNX already holds {'/'.join(types)} types: build it without --precision (its own "
                          "types decide), or pass the FP32 export")
    check_precision(precision, major, strongly_typed)
    return precision


def resolve_build_config(onnx_path: Path, precision: str | None = None, min_batch: int = 1, opt_batch: int = 8,
                         max_batch: int = 32, strongly_typed: bool = False, fp32_norm: bool = True,
                         workspace_mib: int | None = None, timing_cache: Path | None = None,
                         trt_version: int | None = None, engine: Path | None = None) -> BuildConfig:
    """Check the user's choices against the ONNX graph and the TensorRT major (``trt_version``, else installed,
    else 11).

    ``precision=None`` means the default (fp16), or the graph's own types when strongly typed or
    already mixed. ``engine`` places the mixed-precision ONNX beside it.
    """
    from prtool.export.onnx_graph import load_onnx, op_histogram, opset_of
    from prtool.util.files import sha256_file

    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    profile = _input_profile(model, onnx_path, min_batch, opt_batch, max_batch)
    types = graph_float_types(model)
    major = resolve_major(trt_version, installed_tensorrt())
    from prtool.export.quantize import trt_precision

    qdq = trt_precision(model, precision) == "graph"  # explicit INT8 quantization: strongly typed, no flags
    precision = "graph" if qdq else _resolve_precision(precision, strongly_typed, types, major)
    strongly_typed = strongly_typed or precision == "graph"  # the graph's types decide: a typed network on 10 too
    if workspace_mib is not None and workspace_mib <= 0:
        raise PrtoolError(f"--workspace {workspace_mib} must be a positive number of MiB")
    mixed = mixed_onnx_path(onnx_path, precision, engine) if uses_mixed_onnx(precision, major, strongly_typed) else None
    reduced = precision in ("fp16", "bf16", "best")
    keep = fp32_norm and reduced
    weak = weakly_typed(_Typing(major, strongly_typed))
    notes: list[str] = []
    ops = op_histogram(model)
    if keep and "LayerNormalization" not in ops and "ReduceMean" in ops:
        notes.append(f"opset {opset_of(model)}: LayerNorm is decomposed into primitive ops, which cannot be kept "
                     "in FP32 by type; re-export at opset >= 17")
    patterns = fp32_layer_patterns(model) if keep and weak else ()
    if keep and weak and patterns is None:
        notes.append("some LayerNorm/Softmax nodes cannot be named on trtexec's command line: the trtexec command "
                     "leaves them to the builder; `prtool build` pins them by layer type")
    if precision == "best":
        notes.append("best = FP16 + BF16 (+TF32); trtexec --best would also enable INT8/FP8 without calibration")
    if mixed is not None:
        notes.append(f"TensorRT {major} builds {precision} from a mixed-precision ONNX: prtool writes {mixed} first "
                     "(LayerNorm, Softmax, ranking scores and index path in FP32; `--mixed-onnx-only` writes just it)")
    if qdq:
        notes.append("explicit quantization: INT8 from the graph's Q/DQ nodes, built strongly typed (no calibrator, "
                     "no precision flags)")
    elif precision == "graph" and types == ("fp32",):
        notes.append("strongly typed FP32 graph: the engine runs in FP32 (pass --precision fp16 for a mixed-precision "
                     "build)")
    return BuildConfig(onnx=onnx_path, onnx_sha256=sha256_file(onnx_path), profile=profile, precision=precision,
                       graph_float_types=types, strongly_typed=strongly_typed, fp32_norm=keep,
                       fp32_layer_patterns=patterns, workspace_mib=workspace_mib,
                       timing_cache=Path(timing_cache) if timing_cache else None, trt_major=major, mixed_onnx=mixed,
                       notes=tuple(notes))


@dataclass(frozen=True)
class _Typing:
    """The two fields :func:`~prtool.runtime.trt_version.weakly_typed` reads, before the config exists."""

    trt_major: int
    strongly_typed: bool


def shell_command(cmd: list[str]) -> str:
    return shlex.join(cmd)
