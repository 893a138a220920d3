"""TensorRT 10: build an engine from a :class:`BuildConfig`, and run one after checking its manifest.

Written against TensorRT 10's public Python API; ``tensorrt`` is imported inside the functions
(``pip install 'prtool[gpu]'``), so nothing here is needed for ``prtool --help`` or a dry run.
Buffers are torch CUDA tensors, so no pycuda/cuda-python is needed either.
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
from prtool.manifest import write_json_atomic

log = logging.getLogger(__name__)


def import_tensorrt():
    return require("tensorrt", "gpu", "building and running TensorRT engines")


def _cuda_torch():
    import torch

    if not torch.cuda.is_available():
        raise PrtoolError("no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT engines need one; "
                          "use `prtool build --dry-run` to resolve the configuration here")
    return torch


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
    trt = import_tensorrt()
    torch = _cuda_torch()
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": trt.__version__,
            "cuda": {"driver": cuda_driver_version(), "torch_build": torch.version.cuda},
            "gpu": {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}}


def pin_fp32_layers(network, trt) -> list[str]:
    """Run every normalization and softmax layer in FP32; returns their names.

    At opset >= 17 the ONNX parser turns LayerNormalization into one normalization layer, whose
    FP16 reductions overflow on CLIP activations. Needs ``OBEY_PRECISION_CONSTRAINTS``.
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


def _parse(trt, cfg: BuildConfig, logger):
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if cfg.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(cfg.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PrtoolError(f"TensorRT's ONNX parser rejected {cfg.onnx}: {errors[0] if errors else 'no detail'}"
                          f"{f' (+{len(errors) - 1} more)' if len(errors) > 1 else ''}; `prtool inspect` checks readiness")
    name = network.get_input(0).name
    if network.num_inputs != 1 or name != cfg.profile.input_name:
        raise PrtoolError(f"TensorRT sees inputs {[network.get_input(i).name for i in range(network.num_inputs)]}, "
                          f"expected [{cfg.profile.input_name!r}]")
    return builder, network, parser


def build_engine(cfg: BuildConfig, out: Path) -> dict:
    """Build ``out`` (.plan) and ``out.json`` (its manifest) atomically; returns the manifest."""
    trt = import_tensorrt()
    out = Path(out)
    runtime = runtime_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = _parse(trt, cfg, logger)  # the parser owns the weights until the build ends
    config = builder.create_builder_config()
    if cfg.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    for flag in cfg.enabled_types:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not cfg.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = []
    if cfg.fp32_norm:
        pinned = pin_fp32_layers(network, trt)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    shapes = cfg.profile.shapes()
    profile.set_shape(cfg.profile.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if cfg.timing_cache is not None:
        blob = cfg.timing_cache.read_bytes() if cfg.timing_cache.exists() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)

    log.info("building %s (%s, profile %s, %d layers pinned to FP32)", out.name, cfg.precision,
             cfg.profile.to_dict(), len(pinned))
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PrtoolError(f"TensorRT could not build an engine from {cfg.onnx} (its log above names the layer); "
                          "try --precision fp32 or a larger --workspace")
    seconds = time.perf_counter() - start
    plan_bytes = bytes(plan)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
    manifest = build_engine_manifest(cfg, out.name, plan_bytes, runtime, engine_io(engine, trt), pinned, seconds)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".prtool-build-", dir=out.parent))
    try:
        (tmpdir / out.name).write_bytes(plan_bytes)
        write_json_atomic(tmpdir / engine_manifest_path(out).name, manifest)
        if cfg.timing_cache is not None:
            cfg.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            cache_tmp = cfg.timing_cache.with_name(f".{cfg.timing_cache.name}.tmp")
            cache_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
            os.replace(cache_tmp, cfg.timing_cache)
        os.replace(tmpdir / out.name, out)
        os.replace(tmpdir / engine_manifest_path(out).name, engine_manifest_path(out))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return manifest


class TensorRTRunner:
    """``infer(pixels [B, 3, H, W]) -> {output name: np.ndarray}`` on a checked engine.

    Refuses (``PrtoolError``) an engine without a manifest, or one built for another TensorRT
    version or GPU. Inputs may be numpy arrays or torch tensors (moved to the GPU as float32).
    """

    def __init__(self, plan: Path, device: int = 0):
        self.plan = Path(plan)
        self.manifest = read_engine_manifest(self.plan)
        trt = import_tensorrt()
        torch = _cuda_torch()
        check_engine_compatible(self.manifest, runtime_info(device), self.plan)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise PrtoolError(f"TensorRT could not deserialize {self.plan}: rebuild it with `prtool build`")
        self.context = self.engine.create_execution_context()
        io = engine_io(self.engine, trt)
        self.inputs = [t["name"] for t in io if t["mode"] == "input"]
        self.outputs = [t["name"] for t in io if t["mode"] == "output"]
        self._dtypes = {t["name"]: getattr(torch, t["dtype"]) for t in io}
        self.device = torch.device("cuda", device)
        profile = self.manifest["profile"]
        self.batch_range = (profile["min"][0], profile["max"][0])

    def infer(self, pixels) -> dict[str, np.ndarray]:
        import torch

        x = torch.as_tensor(pixels).to(self.device, torch.float32).contiguous()
        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise PrtoolError(f"batch {x.shape[0]} is outside the engine's profile {lo}..{hi}: rebuild with "
                              "--min-batch/--max-batch covering it")
        name = self.inputs[0]
        self.context.set_input_shape(name, tuple(x.shape))
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for out in self.outputs:
            buf = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self._dtypes[out], device=self.device)
            self.context.set_tensor_address(out, buf.data_ptr())
            outs[out] = buf
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise PrtoolError(f"TensorRT failed to run {self.plan}")
        stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t.long()).cpu().numpy() for n, t in outs.items()}
