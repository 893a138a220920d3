"""Where PyTorch work runs and in what precision: ``--device`` and ``--precision`` in one place.

``resolve_device("auto")`` is CUDA when a GPU is visible, else CPU; an explicit ``cuda`` on a
machine without one is a user error, never a silent CPU fallback. ``autocast(device, precision)``
runs a block in fp16/bf16 autocast (weights stay fp32, matmuls and convolutions run in the low
precision, LayerNorm and softmax in fp32, as ``torch.autocast`` decides) or does nothing for fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch

from prtool.errors import PrtoolError

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device that exists on this machine. Under
    ``torchrun``, ``cuda`` and ``auto`` mean this process's GPU, ``cuda:$LOCAL_RANK``."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PrtoolError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PrtoolError(f"--device {name}: this machine has no CUDA GPU visible to PyTorch "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PrtoolError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible; "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise PrtoolError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrtoolError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str = "fp32", cache_enabled: bool = True):
    """A context manager: ``torch.autocast`` in ``precision`` on ``device``'s type, or a no-op for fp32.

    ``cache_enabled=False`` is needed inside CUDA graph capture (the cast-weight cache must not
    outlive the capture)."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_report(device: torch.device | str) -> dict:
    """What ran the work: for CUDA the GPU's name, compute capability and the TF32 switches (they
    change fp32 results: convolutions use TF32 by default, matmuls do not)."""
    dev = torch.device(device)
    out = {"device": str(dev)}
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        out.update({"gpu": torch.cuda.get_device_name(idx),
                    "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(idx))),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                    "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    return out
