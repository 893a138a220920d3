"""TensorRT 11 (and 10.8+): build an engine from a :class:`BuildConfig`, and run one after checking its manifest.

Written against TensorRT's public Python API; ``tensorrt`` is imported inside the functions
(``pip install 'prtool[gpu]'``), so nothing here is needed for ``prtool --help`` or a dry run.
What differs between majors (builder and network flags) comes from
:mod:`prtool.runtime.trt_version`. Buffers are torch CUDA tensors, so no pycuda/cuda-python is
needed either; the CUDA calls go through :data:`CUDA`, which tests replace to reach the error
paths on a CPU machine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from prtool.deploy.build_config import BuildConfig
from prtool.deploy.engine_manifest import (
    build_engine_manifest,
    check_engine_compatible,
    engine_manifest_path,
    read_engine_manifest,
)
from prtool.errors import PrtoolError, require
from prtool.runtime.trt_version import builder_flags, check_runtime_major, network_flags, pins_layers
from prtool.util.files import write_json_atomic

log = logging.getLogger(__name__)


def load_tensorrt():
    """``(tensorrt, logger)`` with TensorRT's plugin registry initialised.

    onnx-tensorrt maps ``ScatterElements`` with a reduction (ToMe's and every merge's) to the
    registry plugin "ScatterElements": without ``init_libnvinfer_plugins`` parsing such a graph, or
    deserialising its engine, fails. Called before every parse and deserialisation.
    """
    trt = require("tensorrt", "gpu", "building and running TensorRT engines")
    logger = trt.Logger(trt.Logger.WARNING)
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise PrtoolError("TensorRT's plugin library did not initialise (init_libnvinfer_plugins returned False): "
                          "reinstall TensorRT with pip install --force-reinstall 'prtool[gpu]'")
    return trt, logger


class _TorchCuda:
    """The few CUDA calls prtool's TensorRT code makes, through torch."""

    def torch(self):
        import torch

        if not torch.cuda.is_available():
            raise PrtoolError("no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT engines need "
                              "one; use `prtool build --dry-run` to resolve the configuration here")
        return torch

    def use_device(self, index: int):
        """Make GPU ``index`` current (TensorRT works on the current device) and return its torch device."""
        torch = self.torch()
        if not 0 <= index < torch.cuda.device_count():
            raise PrtoolError(f"GPU {index} does not exist (this machine has {torch.cuda.device_count()})")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def new_stream(self, device):
        """A dedicated stream: enqueueing on the legacy default stream costs TensorRT extra synchronisations."""
        return self.torch().cuda.Stream(device)

    def wait_current(self, stream, device) -> None:
        """``stream`` waits for work queued on the current stream (the input copy)."""
        stream.wait_stream(self.torch().cuda.current_stream(device))


CUDA = _TorchCuda()


def cuda_driver_version() -> str | None:
    """The CUDA driver API version (``"12.4"``) from ``libcuda``, or None where no driver is loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(value)) != 0:
        return None
    return f"{value.value // 1000}.{value.value % 1000 // 10}"


def runtime_info(device: int = 0) -> dict:
    """The running system as an engine manifest records it: TensorRT, CUDA, GPU."""
    trt = require("tensorrt", "gpu", "building and running TensorRT engines")
    torch = CUDA.torch()
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": trt.__version__,
            "cuda": {"driver": cuda_driver_version(), "torch_build": torch.version.cuda},
            "gpu": {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}}


def pin_fp32_layers(network, trt) -> list[str]:
    """Run every normalization and softmax layer in FP32; returns their names.

    At opset >= 17 the ONNX parser turns LayerNormalization into one normalization layer, whose
    FP16 reductions overflow on CLIP activations. Needs ``OBEY_PRECISION_CONSTRAINTS``; TensorRT 10
    weakly typed builds only (on 11 the mixed-precision ONNX carries the FP32 types).
    """
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
            layer.precision = trt.float32
            pinned.append(layer.name)
    return pinned


def _dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int32: "int32",
             trt.int64: "int64", trt.bool: "bool", trt.int8: "int8"}
    return names.get(dtype, str(dtype))


def engine_io(engine, trt) -> list[dict]:
    """``[{name, mode, dtype, shape}]`` of a deserialized engine (batch shows as -1)."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        out.append({"name": name, "mode": mode, "dtype": _dtype_name(trt, engine.get_tensor_dtype(name)),
                    "shape": list(engine.get_tensor_shape(name))})
    return out


def deserialize_engine(runtime, blob: bytes, what):
    """``runtime.deserialize_cuda_engine(blob)``, refusing None (a plan from another TensorRT or a corrupt file)."""
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise PrtoolError(f"TensorRT could not deserialize {what} (its log above says why: another TensorRT version, "
                          "another GPU or a damaged file): rebuild it with `prtool build`")
    return engine


def _parse(trt, cfg: BuildConfig, logger):
    builder = trt.Builder(logger)
    flags = 0
    for name in network_flags(cfg):
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(cfg.build_onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PrtoolError(f"TensorRT's ONNX parser rejected {cfg.build_onnx}: {errors[0] if errors else 'no detail'}"
                          f"{f' (+{len(errors) - 1} more)' if len(errors) > 1 else ''}; `prtool inspect` checks "
                          "readiness")
    name = network.get_input(0).name
    if network.num_inputs != 1 or name != cfg.profile.input_name:
        raise PrtoolError(f"TensorRT sees inputs {[network.get_input(i).name for i in range(network.num_inputs)]}, "
                          f"expected [{cfg.profile.input_name!r}]")
    return builder, network, parser


def _configure(trt, builder, network, cfg: BuildConfig):
    """The builder config for ``cfg.trt_major``; returns it and the layers pinned to FP32 (weak typing only)."""
    config = builder.create_builder_config()
    if cfg.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    for flag in builder_flags(cfg):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not cfg.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = pin_fp32_layers(network, trt) if pins_layers(cfg) else []
    profile = builder.create_optimization_profile()
    shapes = cfg.profile.shapes()
    profile.set_shape(cfg.profile.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if cfg.timing_cache is not None:
        blob = cfg.timing_cache.read_bytes() if cfg.timing_cache.exists() else b""
        if not config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
            raise PrtoolError(f"TensorRT refused the timing cache {cfg.timing_cache} (made by another TensorRT "
                              "version or GPU): delete it, or pass another --timing-cache")
    return config, pinned


def _write_outputs(out: Path, plan_bytes: bytes, manifest: dict, cache_blob: bytes | None, cfg: BuildConfig) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".prtool-build-", dir=out.parent))
    try:
        (tmpdir / out.name).write_bytes(plan_bytes)
        write_json_atomic(tmpdir / engine_manifest_path(out).name, manifest)
        if cache_blob is not None:
            cfg.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            cache_tmp = cfg.timing_cache.with_name(f".{cfg.timing_cache.name}.tmp")
            cache_tmp.write_bytes(cache_blob)
            os.replace(cache_tmp, cfg.timing_cache)
        os.replace(tmpdir / out.name, out)
        os.replace(tmpdir / engine_manifest_path(out).name, engine_manifest_path(out))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def build_engine(cfg: BuildConfig, out: Path) -> dict:
    """Build ``out`` (.plan) and ``out.json`` (its manifest) atomically; returns the manifest.

    For fp16/bf16 on TensorRT 11 (or 10 strongly typed) the mixed-precision ONNX is written first.
    """
    trt, logger = load_tensorrt()
    check_runtime_major(cfg.trt_major, trt.__version__)
    out = Path(out)
    runtime = runtime_info()
    if cfg.mixed_onnx is not None:
        from prtool.export.mixed_precision import write_mixed_onnx

        write_mixed_onnx(cfg.onnx, cfg.mixed_onnx, cfg.precision, cfg.fp32_norm)
    builder, network, _parser = _parse(trt, cfg, logger)  # the parser owns the weights until the build ends
    config, pinned = _configure(trt, builder, network, cfg)
    log.info("building %s (TensorRT %s, %s, profile %s, %d layers pinned to FP32)", out.name, trt.__version__,
             cfg.precision, cfg.profile.to_dict(), len(pinned))
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PrtoolError(f"TensorRT could not build an engine from {cfg.build_onnx} (its log above names the layer); "
                          "try --precision fp32 or a larger --workspace")
    seconds = time.perf_counter() - start
    plan_bytes = bytes(plan)
    engine = deserialize_engine(trt.Runtime(logger), plan_bytes, f"the engine just built from {cfg.build_onnx}")
    manifest = build_engine_manifest(cfg, out.name, plan_bytes, runtime, engine_io(engine, trt), pinned, seconds)
    cache_blob = None
    if cfg.timing_cache is not None:
        cache = config.get_timing_cache()
        if cache is None:
            log.warning("TensorRT returned no timing cache; %s is left as it was", cfg.timing_cache)
        else:
            cache_blob = bytes(cache.serialize())
    _write_outputs(out, plan_bytes, manifest, cache_blob, cfg)
    return manifest


class TensorRTRunner:
    """``infer({input name: [B, 3, H, W]}) -> {output name: np.ndarray}`` on a checked engine (the runner
    interface of :func:`prtool.export.validate.compare`).

    Refuses (``PrtoolError``) an engine without a manifest, or one built for another TensorRT
    version or GPU. Inputs may be numpy arrays or torch tensors; they are fed in the engine's own
    input dtype, on GPU ``device`` (made current), and run on a dedicated stream.
    """

    def __init__(self, plan: Path, device: int = 0):
        self.plan = Path(plan)
        self.manifest = read_engine_manifest(self.plan)
        trt, self._logger = load_tensorrt()
        self.device = CUDA.use_device(device)  # current before TensorRT touches the GPU
        check_engine_compatible(self.manifest, runtime_info(device), self.plan)
        self._runtime = trt.Runtime(self._logger)
        self.engine = deserialize_engine(self._runtime, self.plan.read_bytes(), self.plan)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PrtoolError(f"TensorRT could not create an execution context for {self.plan} (out of GPU memory?)")
        import torch

        io = engine_io(self.engine, trt)
        self.inputs = [t["name"] for t in io if t["mode"] == "input"]
        self.outputs = [t["name"] for t in io if t["mode"] == "output"]
        self._dtypes = {t["name"]: getattr(torch, t["dtype"]) for t in io}
        self._shapes = {t["name"]: t["shape"] for t in io}
        self.stream = CUDA.new_stream(self.device)
        self._bound: dict = {}
        profile = self.manifest["profile"]
        self.batch_range = (profile["min"][0], profile["max"][0])

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        import torch

        name = self.inputs[0]
        if name not in feeds:
            raise PrtoolError(f"the engine's input is {name!r}, not {sorted(feeds)}: feed {{{name!r}: pixels}}")
        x = torch.as_tensor(feeds[name]).to(self.device, self._dtypes[name]).contiguous()
        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise PrtoolError(f"batch {x.shape[0]} is outside the engine's profile {lo}..{hi}: rebuild with "
                              "--min-batch/--max-batch covering it")
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise PrtoolError(f"the engine rejected input shape {list(x.shape)} for {name} (it takes "
                              f"{self._shapes[name]}, -1 = batch): preprocess images to the exported size")
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for out in self.outputs:
            buf = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self._dtypes[out], device=self.device)
            self.context.set_tensor_address(out, buf.data_ptr())
            outs[out] = buf
        self._bound = {name: x, **outs}  # alive until the stream is done with them
        CUDA.wait_current(self.stream, self.device)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise PrtoolError(f"TensorRT failed to run {self.plan}")
        self.stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t.long()).cpu().numpy() for n, t in outs.items()}
