"""``prtool build`` as one library call: :class:`BuildRequest` holds every option of the command (its
fields, less the positional ``onnx``, are the ``[build]`` recipe schema) and :func:`run_build` resolves
the configuration and writes the mixed-precision ONNX, prints nothing (dry run) or builds the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.util.recipes import NOT_IN_RECIPES


@dataclass
class BuildRequest:
    onnx: Path = field(default=Path("model.onnx"), metadata=NOT_IN_RECIPES)
    out: Path | None = None
    precision: str | None = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    timing_cache: Path | None = None
    strongly_typed: bool = False
    trt_version: int | None = None
    mixed_onnx_only: bool = False
    no_fp32_norm: bool = False
    workspace: int | None = None
    dry_run: bool = False

    @property
    def engine(self) -> Path:
        """The engine path: ``out``, or the ONNX path with .plan."""
        from prtool.deploy.engine_manifest import ENGINE_SUFFIXES

        engine = Path(self.out) if self.out else Path(self.onnx).with_suffix(".plan")
        if engine.suffix not in ENGINE_SUFFIXES:
            raise PrtoolError(f"engine path {engine} must end in {' or '.join(ENGINE_SUFFIXES)}")
        return engine


def build_config(req: BuildRequest):
    """The checked :class:`~prtool.deploy.build_config.BuildConfig` for a request."""
    from prtool.deploy.build_config import resolve_build_config

    return resolve_build_config(Path(req.onnx), req.precision, req.min_batch, req.opt_batch, req.max_batch,
                                req.strongly_typed, not req.no_fp32_norm, req.workspace,
                                Path(req.timing_cache) if req.timing_cache else None, req.trt_version, req.engine)


def write_mixed_only(cfg) -> dict:
    """``--mixed-onnx-only``: the mixed-precision ONNX TensorRT would build, and its record."""
    from prtool.export.mixed_precision import write_mixed_onnx

    if cfg.mixed_onnx is None:
        raise PrtoolError(f"no mixed-precision ONNX for precision {cfg.precision} on TensorRT {cfg.trt_major}: "
                          "--mixed-onnx-only needs --precision fp16/bf16 (TensorRT 11, or 10 with --strongly-typed)")
    record = write_mixed_onnx(cfg.onnx, cfg.mixed_onnx, cfg.precision, cfg.fp32_norm)
    return {"mixed_onnx": str(cfg.mixed_onnx), "manifest": str(cfg.mixed_onnx.with_suffix(".json")), **record}


def run_build(req: BuildRequest) -> dict:
    """Do what ``req`` asks; the result has ``mixed_onnx`` (``mixed_onnx_only``), ``dry_run`` (the
    configuration and the trtexec command) or ``build_seconds`` (an engine was built)."""
    from prtool.deploy.build_config import shell_command, trtexec_command
    from prtool.deploy.engine_manifest import engine_manifest_path

    engine = req.engine
    cfg = build_config(req)
    cmd = trtexec_command(cfg, engine)
    if req.mixed_onnx_only:
        return write_mixed_only(cfg)
    if req.dry_run:
        from prtool.export.onnx_graph import load_onnx, trt_readiness

        return {"dry_run": True, "engine": str(engine), "manifest": str(engine_manifest_path(engine)),
                "config": cfg.to_dict(), "trtexec": shell_command(cmd), "trtexec_argv": cmd,
                "tensorrt_readiness": trt_readiness(load_onnx(Path(req.onnx)))}
    from prtool.deploy.trt import build_engine

    manifest = build_engine(cfg, engine)
    return {"engine": str(engine), "manifest": str(engine_manifest_path(engine)), "tensorrt": manifest["tensorrt"],
            "gpu": manifest["gpu"], "precision": manifest["precision"], "profile": manifest["profile"],
            "build_seconds": manifest["build"]["seconds"], "trtexec": shell_command(cmd)}
