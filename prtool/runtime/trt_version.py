"""The TensorRT version rule, in one place: which major prtool builds for, and what that means.

TensorRT 11 (current on PyPI) removed weak typing: no ``BuilderFlag.FP16/BF16/INT8/FP8``, no
``OBEY/PREFER_PRECISION_CONSTRAINTS``, and trtexec 11 dropped ``--fp16``, ``--bf16``, ``--best``,
``--int8`` (every network is strongly typed; ``--stronglyTyped`` is no longer needed). Reduced
precision lives in the ONNX graph: prtool writes a mixed-precision ONNX
(:mod:`prtool.export.mixed_precision`) and TensorRT builds it as typed. TensorRT 10 (>= 10.8) is
the fallback: weakly typed builds with FP16/BF16 builder flags and LayerNorm/Softmax pinned to FP32
through obeyed precision constraints, or, with ``--strongly-typed``, the same mixed-precision ONNX
as on 11.

Everything here is a pure function of a :class:`~prtool.deploy.build_config.BuildConfig` (or of
version strings), so the flags and the trtexec line of each major are tested without TensorRT.
"""

from __future__ import annotations

from pathlib import Path

from prtool.errors import PrtoolError

SUPPORTED_MAJORS = (10, 11)
DEFAULT_MAJOR = 11  # what `pip install 'prtool[gpu]'` installs
MIN_VERSION = {10: (10, 8), 11: (11, 0)}
REDUCED = ("fp16", "bf16")
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")
# What installs together (pyproject's gpu / gpu-trt10 extras; a test checks they agree): onnxruntime's TensorRT
# provider supports one TensorRT major per release (1.27+ for 11), and PyPI's onnxruntime-gpu is built for CUDA 13
# from 1.27 on (CUDA 12 before), as tensorrt-cu13 / tensorrt-cu12 are.
GPU_STACKS = {
    11: {"extra": "gpu", "cuda": 13, "tensorrt": "tensorrt-cu13>=11.0,<12", "onnxruntime_gpu": ">=1.27,<2"},
    10: {"extra": "gpu-trt10", "cuda": 12, "tensorrt": "tensorrt-cu12>=10.8,<11", "onnxruntime_gpu": ">=1.22,<1.27"},
}


def check_ort_tensorrt(ort_version: str, trt_major: int) -> None:
    """Refuse an onnxruntime whose TensorRT provider was built for the other major (1.27+ is for 11)."""
    built_for = 11 if parse_version(ort_version) >= (1, 27) else 10
    if built_for != trt_major:
        raise PrtoolError(f"onnxruntime {ort_version}'s TensorRT provider is built for TensorRT {built_for}, but "
                          f"TensorRT {trt_major} is installed: {gpu_install_command(trt_major)}")


def gpu_install_command(major: int = DEFAULT_MAJOR) -> str:
    """One command line for a working GPU environment: the extra, then onnxruntime-gpu over the CPU build."""
    stack = GPU_STACKS[major]
    return (f"pip install 'prtool[{stack['extra']}]' && "
            f"pip install --force-reinstall --no-deps 'onnxruntime-gpu{stack['onnxruntime_gpu']}'")


def parse_version(version: str) -> tuple[int, int]:
    """``"11.4.0.106"`` -> ``(11, 4)``."""
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError:
        raise PrtoolError(f"cannot read a TensorRT version from {version!r}") from None
    return major, minor


def installed_tensorrt() -> str | None:
    """The installed TensorRT version from package metadata (nothing is imported), or None."""
    from importlib import metadata

    for dist in TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def resolve_major(requested: int | None, installed: str | None) -> int:
    """The TensorRT major to build for: ``--trt-version`` when given, else the installed one, else 11."""
    if requested is not None and requested not in SUPPORTED_MAJORS:
        raise PrtoolError(f"--trt-version {requested} is not supported: use one of "
                          f"{', '.join(map(str, SUPPORTED_MAJORS))}")
    if installed is None:
        return requested or DEFAULT_MAJOR
    version = parse_version(installed)
    major = version[0]
    if major not in SUPPORTED_MAJORS or version < MIN_VERSION[major]:
        raise PrtoolError(f"TensorRT {installed} is installed; prtool supports 10.8+ and 11.x: "
                          "pip install 'prtool[gpu]' (TensorRT 11) or 'prtool[gpu-trt10]'")
    return requested or major


def check_runtime_major(cfg_major: int, installed: str | None) -> None:
    """Refuse to build for one major with another installed (``--trt-version`` is for dry runs)."""
    if installed is not None and parse_version(installed)[0] != cfg_major:
        raise PrtoolError(f"the configuration is for TensorRT {cfg_major} but TensorRT {installed} is installed: "
                          f"drop --trt-version, or install TensorRT {cfg_major}")


def uses_mixed_onnx(precision: str, major: int, strongly_typed: bool) -> bool:
    """fp16/bf16 come from a mixed-precision ONNX on 11, and on 10 with ``--strongly-typed``."""
    return precision in REDUCED and (major >= 11 or strongly_typed)


def weakly_typed(cfg) -> bool:
    """Only TensorRT 10 without ``--strongly-typed`` still builds weakly typed networks."""
    return cfg.trt_major == 10 and not cfg.strongly_typed


def check_precision(precision: str, major: int, strongly_typed: bool) -> None:
    if precision == "best" and (major >= 11 or strongly_typed):
        why = "TensorRT 11 has no weak typing" if major >= 11 else "a strongly typed network takes no precision flags"
        raise PrtoolError(f"--precision best needs TensorRT 10's weak typing ({why}): use --precision fp16 or bf16")


def network_flags(cfg) -> tuple[str, ...]:
    """``trt.NetworkDefinitionCreationFlag`` names: STRONGLY_TYPED on 10 when typed; none on 11 (always typed)."""
    return ("STRONGLY_TYPED",) if cfg.trt_major == 10 and cfg.strongly_typed else ()


def builder_flags(cfg) -> tuple[str, ...]:
    """``trt.BuilderFlag`` names to set: precision flags exist only for weakly typed TensorRT 10 builds."""
    if not weakly_typed(cfg):
        return ()
    types = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "best": ("FP16", "BF16")}[cfg.precision]
    return types + (("OBEY_PRECISION_CONSTRAINTS",) if cfg.fp32_norm else ())


def pins_layers(cfg) -> bool:
    """Whether the Python build pins LayerNorm/Softmax layers to FP32 (weak typing only)."""
    return weakly_typed(cfg) and cfg.fp32_norm


def trtexec_command(cfg, engine: Path) -> list[str]:
    """The trtexec arguments, for ``cfg.trt_major``, that build the same engine as ``prtool build``."""
    p = cfg.profile
    cmd = ["trtexec", f"--onnx={cfg.build_onnx}", f"--saveEngine={engine}",
           f"--minShapes={p.trtexec_spec(p.min_batch)}", f"--optShapes={p.trtexec_spec(p.opt_batch)}",
           f"--maxShapes={p.trtexec_spec(p.max_batch)}"]
    flags = builder_flags(cfg)
    cmd += [f"--{t.lower()}" for t in flags if t in ("FP16", "BF16")]
    if not cfg.tf32:
        cmd.append("--noTF32")
    if "STRONGLY_TYPED" in network_flags(cfg):
        cmd.append("--stronglyTyped")
    if "OBEY_PRECISION_CONSTRAINTS" in flags:
        cmd.append("--precisionConstraints=obey")
        if cfg.fp32_layer_patterns:
            cmd.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in cfg.fp32_layer_patterns))
    if cfg.timing_cache is not None:
        cmd.append(f"--timingCacheFile={cfg.timing_cache}")
    if cfg.workspace_mib is not None:
        cmd.append(f"--memPoolSize=workspace:{cfg.workspace_mib}")  # a bare number is MiB
    cmd.append("--skipInference")
    return cmd
