"""What this machine offers prtool: package versions, onnxruntime providers, TensorRT, CUDA.

Never touches the network; optional packages that are missing are reported, not raised.
"""

from __future__ import annotations

import os
import platform


def _version(distribution: str) -> str | None:
    """An installed distribution's version, read from its metadata (nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env() -> dict:
    import torch

    from prtool.errors import PrtoolError
    from prtool.runtime.trt_version import installed_tensorrt, resolve_major

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "prtool": _version("prtool"),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available()
            else [],
        "open_clip": _version("open_clip_torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime-gpu") or _version("onnxruntime"),
        # both listed: they share one `onnxruntime` package, and the one installed last wins
        "onnxruntime_distributions": [d for d in ("onnxruntime", "onnxruntime-gpu") if _version(d)],
        "onnxruntime_providers": [],
        "polygraphy": _version("polygraphy"),
        "tensorrt": installed_tensorrt(),
        "tensorrt_build_major": None,
        "nvidia_modelopt": _version("nvidia-modelopt"),
    }
    try:
        info["tensorrt_build_major"] = resolve_major(None, info["tensorrt"])
    except PrtoolError as exc:
        info["tensorrt_build_major"] = str(exc)
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        pass
    return info


def env_fingerprint() -> str:
    """A short, file-name-safe tag of the machine: ``cpu-2t-amd-epyc`` or ``gpu-nvidia-h200``."""
    import re

    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{torch.get_num_threads()}t-" + re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")[:24]
