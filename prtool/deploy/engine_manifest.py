"""The manifest beside every TensorRT engine, and the refusal of an engine built for another system.

A serialized engine only runs on the TensorRT version that built it and on GPUs of the same
architecture ("version tag does not match" otherwise). ``model.plan`` therefore always comes
with ``model.plan.json``: TensorRT/CUDA/driver versions, GPU name and compute capability,
precision, profile, the source ONNX's sha256 and its prtool manifest, and the build settings.
:func:`engine_mismatches` compares a manifest with a running system as plain dicts, so the
refusal logic is tested without a GPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.export.manifest import MANIFEST_VERSION, package_versions, read_manifest_for

ENGINE_KIND = "tensorrt-engine"
ENGINE_SUFFIXES = (".plan", ".engine")


def engine_manifest_path(plan: Path) -> Path:
    """``model.plan`` -> ``model.plan.json`` (``model.json`` stays the ONNX manifest)."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def build_engine_manifest(cfg, plan_name: str, plan_bytes: bytes, runtime: dict, io: list[dict],
                          pinned_layers: list[str], build_seconds: float) -> dict:
    """Everything needed to decide later whether an engine may run on a machine.

    ``cfg`` is the :class:`~prtool.deploy.build_config.BuildConfig`; ``runtime`` is
    :func:`prtool.deploy.trt.runtime_info`; ``io`` lists the engine's tensors
    (``name``, ``mode``, ``dtype``, ``shape`` with -1 for the batch).
    """
    return {
        "prtool_manifest": MANIFEST_VERSION,
        "kind": ENGINE_KIND,
        "engine_file": plan_name,
        "engine_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "tensorrt": runtime["tensorrt"],
        "cuda": runtime["cuda"],
        "gpu": runtime["gpu"],
        "precision": cfg.precision,
        "validation_preset": cfg.tolerance_key,
        "profile": cfg.profile.to_dict(),
        "io": io,
        "source_onnx": {"file": cfg.onnx.name, "sha256": cfg.onnx_sha256, "manifest": read_manifest_for(cfg.onnx)},
        "build": {**cfg.to_dict(), "pinned_fp32_layers": len(pinned_layers), "seconds": round(build_seconds, 1)},
        "versions": package_versions(),
    }


def read_engine_manifest(plan: Path, check_hash: bool = True) -> dict:
    """The manifest of ``plan``; an engine without one (or with another engine's) is refused."""
    plan = Path(plan)
    if not plan.exists():
        raise PrtoolError(f"engine {plan} does not exist")
    side = engine_manifest_path(plan)
    if not side.exists():
        raise PrtoolError(f"engine {plan} has no manifest {side.name}: prtool runs only engines it can check against "
                          "this machine; rebuild it with `prtool build`")
    try:
        manifest = json.loads(side.read_text())
    except ValueError as exc:
        raise PrtoolError(f"engine manifest {side} is not valid JSON ({exc}): "
                          "rebuild the engine with `prtool build`") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != ENGINE_KIND:
        raise PrtoolError(f"{side} is not a prtool engine manifest: rebuild the engine with `prtool build`")
    if check_hash:
        check_engine_hash(plan, side, manifest)
    return manifest


def check_engine_hash(plan: Path, side: Path, manifest: dict) -> None:
    """Refuse, in one line naming both files, an engine whose bytes are not the ones its manifest describes."""
    from prtool.util.files import sha256_file

    want = manifest.get("engine_sha256")
    got = sha256_file(plan)  # streamed: engines can be gigabytes
    if got != want:
        recorded = f"sha256 {want[:12]}..." if isinstance(want, str) else "no sha256"
        raise PrtoolError(f"manifest {side} describes another engine ({recorded}) than {plan} (sha256 {got[:12]}...): "
                          "the engine or its manifest was replaced or damaged; rebuild the engine with `prtool build`, "
                          "which writes both")


def describe_system(info: dict) -> str:
    """``TensorRT 10.3.0 on NVIDIA L4 (compute capability 8.9)``."""
    gpu = info.get("gpu") or {}
    return (f"TensorRT {info.get('tensorrt')} on {gpu.get('name')} "
            f"(compute capability {gpu.get('compute_capability')})")


def engine_mismatches(manifest: dict, runtime: dict) -> list[str]:
    """What differs between the system an engine was built on and the running one (empty: compatible).

    Both arguments hold ``tensorrt`` (version string) and ``gpu`` (``name``, ``compute_capability``).
    The TensorRT version must match exactly; so must the GPU's compute capability and name
    (same-architecture GPUs can differ in tactics and limits, so prtool does not gamble on them).
    """
    out = []
    if manifest.get("tensorrt") != runtime.get("tensorrt"):
        out.append(f"TensorRT {manifest.get('tensorrt')} != {runtime.get('tensorrt')}")
    built, here = manifest.get("gpu") or {}, runtime.get("gpu") or {}
    if built.get("compute_capability") != here.get("compute_capability"):
        out.append(f"compute capability {built.get('compute_capability')} != {here.get('compute_capability')}")
    if built.get("name") != here.get("name"):
        out.append(f"GPU {built.get('name')!r} != {here.get('name')!r}")
    return out


def check_engine_compatible(manifest: dict, runtime: dict, plan: Path | str = "the engine") -> None:
    """Raise a :class:`PrtoolError` naming both systems when the engine was built for another one."""
    diffs = engine_mismatches(manifest, runtime)
    if diffs:
        raise PrtoolError(
            f"{plan} was built for {describe_system(manifest)}, but this machine has {describe_system(runtime)} "
            f"({'; '.join(diffs)}): rebuild the engine here with `prtool build`"
        )
