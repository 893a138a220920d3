"""onnxruntime on the CPU, CUDA or TensorRT execution provider, refusing a silent CPU fallback.

onnxruntime-gpu quietly drops to ``CPUExecutionProvider`` when the CUDA or TensorRT libraries
fail to load: the session works, only 20x slower. Sessions come from the one factory,
:func:`prtool.runtime.session.ort_session`, which takes its GPU providers from :func:`gpu_providers` here.
:func:`check_providers` compares the providers the session actually got (``session.get_providers()``)
with the one requested and raises a :class:`PrtoolError` naming both; it needs only an object with
``get_providers()``, so the check is tested on CPU with a fake session.
"""

from __future__ import annotations

from pathlib import Path

from prtool.errors import PrtoolError, require
from prtool.runtime.trt_version import check_ort_tensorrt, gpu_install_command

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# Precisions each provider can run prtool's FP32 graphs at (bf16 engines: `prtool build`).
PROVIDER_PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32",), "tensorrt": ("fp32", "fp16")}

# `onnxruntime` (a base dependency) and `onnxruntime-gpu` install the same `onnxruntime` package: whichever was
# installed last wins, so the GPU build is reinstalled over it without touching its dependencies.
FALLBACK_HINT = (f"install onnxruntime-gpu over the CPU build ({gpu_install_command(11)}; TensorRT 10 / CUDA 12: "
                 f"{gpu_install_command(10)}), then check `prtool env`")


def check_precision(provider: str, precision: str) -> None:
    """Refuse a precision ``provider`` cannot run prtool's FP32 graphs at."""
    if provider not in PROVIDERS:
        raise PrtoolError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if precision not in PROVIDER_PRECISIONS[provider]:
        raise PrtoolError(f"the {provider} provider runs prtool's graphs at {'/'.join(PROVIDER_PRECISIONS[provider])}, "
                          f"not {precision}: build a TensorRT engine with `prtool build --precision {precision}`")


def check_providers(provider: str, session) -> list[str]:
    """The session's providers; raises when the requested one is missing (a silent fallback)."""
    want = PROVIDERS[provider][0]
    active = list(session.get_providers())
    if want not in active:
        raise PrtoolError(f"onnxruntime fell back from {want} to {', '.join(active) or 'nothing'}: the {provider} "
                          f"libraries did not load; {FALLBACK_HINT}")
    return active


def provider_options(provider: str, precision: str = "fp32", profile=None, fp32_norm: bool = True,
                     cache_dir: Path | None = None, trt_major: int | None = None) -> list[dict]:
    """Options for each entry of ``PROVIDERS[provider]``, in order.

    For CUDA at fp32: ``use_tf32=0`` (onnxruntime enables TF32 by default, which the fp32 preset does
    not allow). For TensorRT: FP16 when asked (TensorRT 10 only: 11 has no weak typing, so its fp16
    comes from the mixed-precision ONNX), LayerNorm kept in FP32 (``trt_layer_norm_fp32_fallback``),
    the batch-only optimization profile (``profile``: a :class:`~prtool.deploy.build_config.Profile`),
    and engine/timing caches under ``cache_dir`` (building an engine takes minutes).
    """
    check_precision(provider, precision)
    opts: list[dict] = [{} for _ in PROVIDERS[provider]]
    if "CUDAExecutionProvider" in PROVIDERS[provider] and precision == "fp32":
        opts[PROVIDERS[provider].index("CUDAExecutionProvider")] = {"use_tf32": "0"}
    if provider == "tensorrt" and precision == "fp16" and trt_major is not None and trt_major >= 11:
        raise PrtoolError("TensorRT 11 has no weak typing, so onnxruntime cannot lower this graph to fp16: write the "
                          "mixed-precision ONNX (`prtool build MODEL.onnx --mixed-onnx-only`) and run that at fp32")
    if provider == "tensorrt":
        trt = {"trt_fp16_enable": precision == "fp16",
               "trt_layer_norm_fp32_fallback": precision == "fp16" and fp32_norm}
        if profile is not None:
            trt.update({"trt_profile_min_shapes": profile.trtexec_spec(profile.min_batch),
                        "trt_profile_opt_shapes": profile.trtexec_spec(profile.opt_batch),
                        "trt_profile_max_shapes": profile.trtexec_spec(profile.max_batch)})
        if cache_dir is not None:
            trt.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)})
        opts[0] = trt
    return opts


def gpu_providers(ort, provider: str, precision: str = "fp32", profile=None, fp32_norm: bool = True,
                  cache_dir: Path | None = None) -> list[tuple[str, dict]]:
    """``[(provider name, options)]`` for :func:`prtool.runtime.session.ort_session` on a GPU ``provider``.

    Refuses a provider this onnxruntime build lacks; for TensorRT, imports ``tensorrt`` first (the
    wheel preloads the libraries the provider finds) and checks its major against onnxruntime's.
    """
    want = PROVIDERS[provider][0]
    available = ort.get_available_providers()
    if want not in available:
        raise PrtoolError(f"{want} is not in this onnxruntime build (it has {', '.join(available)}): {FALLBACK_HINT}")
    trt_major = None
    if provider == "tensorrt":
        # The TensorRT provider finds pip-installed TensorRT libraries only after `import tensorrt` (the wheel
        # preloads them); its major decides what fp16 means.
        trt = require("tensorrt", "gpu", "onnxruntime's TensorRT provider (the tensorrt wheel loads its libraries)")
        trt_major = int(str(trt.__version__).split(".")[0])
        check_ort_tensorrt(ort.__version__, trt_major)
    opts = provider_options(provider, precision, profile, fp32_norm, cache_dir, trt_major)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return list(zip(PROVIDERS[provider], opts, strict=True))
