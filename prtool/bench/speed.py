"""``prtool bench speed``: latency of the baseline, Patch Ranking and the peers, side by side.

Every variant is exported (ONNX backends) or built (torch) once, then all variants run
interleaved in one process (``prtool.util.timing``), after warm-up, per batch size. Reported per
variant: p50/p90/p99 latency, images/s, speedup vs the baseline, the ideal FLOP-ratio speedup and
``measured_over_ideal``. The pruning machinery (scorer + TopK + gather) is costed against a
``static`` twin that keeps the same token counts by a fixed slice (no scoring, no TopK, no gather).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from prtool.encoder import methods
from prtool.encoder.build import build_pruned_encoder, method_spec, schedule_for
from prtool.encoder.flops import encoder_cost
from prtool.errors import PrtoolError
from prtool.export.io_names import PIXELS
from prtool.util.device import autocast, check_precision, device_report, resolve_device
from prtool.util.timing import cuda_event_clock, interleaved_latency, wall_clock

log = logging.getLogger(__name__)

VARIANTS = methods.names("speed")  # every method that exports (prtool.encoder.methods); the unpruned row is "baseline"
BACKENDS = ("torch", "onnxruntime", "onnxruntime-cuda", "tensorrt")


def _runner(backend: str, encoder, onnx_path: Path | None, device: torch.device, batch_sizes: list[int] | None = None,
            precision: str | None = None, cuda_graphs: bool = False):
    """A callable running one variant on ``backend``. The torch backend runs on ``device`` under
    ``precision`` autocast (fp32 by default) and returns without waiting for the GPU (its clock is
    :func:`cuda_event_clock`); the other backends return when the outputs are on the host (ONNX
    Runtime's ``run`` and :class:`TensorRTRunner` copy outputs back)."""
    if backend == "torch":
        return _torch_runner(encoder.to(device), device, precision or "fp32", cuda_graphs)
    if backend == "onnxruntime":
        from prtool.runtime.session import ort_session

        sess = ort_session(onnx_path)
        return lambda x: sess.run(None, {PIXELS: x})
    if backend == "onnxruntime-cuda":
        from prtool.runtime.session import OrtRunner

        runner = OrtRunner(onnx_path, "cuda")
        return lambda x: runner.infer({PIXELS: x})
    if backend == "tensorrt":
        from prtool.deploy.build_config import resolve_build_config
        from prtool.deploy.trt import TensorRTRunner, build_engine

        sizes = batch_sizes or [1]
        precision = precision or "fp16"
        cfg = resolve_build_config(onnx_path, precision, min_batch=min(sizes), opt_batch=max(sizes),
                                   max_batch=max(sizes))
        plan = Path(onnx_path).with_suffix(f".{precision}.plan")
        build_engine(cfg, plan)
        engine = TensorRTRunner(plan)
        return lambda x: engine.infer({PIXELS: x})
    raise PrtoolError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def _torch_runner(enc, device: torch.device, precision: str, cuda_graphs: bool):
    """``run(x)`` under inference mode and autocast; with ``cuda_graphs`` each input shape is captured
    once into a CUDA graph (on its first call, i.e. during warm-up) and replayed after that."""
    if not cuda_graphs:
        def run(x):
            with torch.inference_mode(), autocast(device, precision):
                return enc(x)

        return run
    if device.type != "cuda":
        raise PrtoolError("--cuda-graphs needs --device cuda")
    graphs: dict[tuple, tuple] = {}

    def replay(x):
        if tuple(x.shape) not in graphs:
            graphs[tuple(x.shape)] = _capture(enc, x, device, precision)
        static_x, graph, out = graphs[tuple(x.shape)]
        static_x.copy_(x)
        graph.replay()
        return out

    return replay


def _capture(enc, x, device: torch.device, precision: str) -> tuple:
    """``(static input, CUDA graph, static output)`` of ``enc`` at ``x``'s shape (warmed up on a side
    stream first, as CUDA graph capture requires; autocast's weight cache off inside the capture)."""
    static_x = x.clone()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode(), autocast(device, precision, cache_enabled=False):
        for _ in range(3):
            enc(static_x)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), autocast(device, precision, cache_enabled=False):
        out = enc(static_x)
    return static_x, graph, out


def bench_speed(loaded, schedule_text: str | None, keep_ratio: float | None, stages: int, first_block: int | None,
                variants: list[str], backends: list[str], batch_sizes: list[int], predictor: Path | None = None,
                warmup: int = 3, iters: int = 20, workdir: Path | None = None, device: str = "auto",
                precision: str | None = None, cuda_graphs: bool = False, calib: dict | None = None) -> dict:
    """Time every variant on every backend, interleaved. ``device`` and ``precision`` (fp32, fp16 or
    bf16 autocast; default fp32) apply to the torch backend; TensorRT builds in ``precision`` (default fp16).
    ``NAME+MODE`` variants (``patch-ranking+int8-qdq``) are quantized ONNX (``calib``: prtool.bench.quantize_bench)."""
    from prtool.bench.quantize_bench import check_variants, export_variant

    check_variants(variants, backends, calib)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise PrtoolError(f"unknown backends {unknown}: use {', '.join(BACKENDS)}")
    chosen = {v: methods.get_method(v.split("+")[0], "speed") for v in variants}
    sched = schedule_for(loaded, schedule_text, keep_ratio, stages, first_block)
    if sched.is_empty:
        raise PrtoolError("bench speed needs a pruning schedule (--schedule or --keep-ratio)")
    dev = resolve_device(device)  # the torch backend's device
    if precision is not None:
        check_precision(precision)
    specs = {"baseline": method_spec(methods.METHODS["none"], sched)}
    specs.update({v: specs["baseline"] if m.name == "none" else method_spec(m, sched, predictor)
                  for v, m in chosen.items() if v != "baseline"})
    encoders, costs = {}, {}
    for name, spec in specs.items():
        encoders[name], _ = build_pruned_encoder(loaded, spec)
        costs[name] = encoder_cost(encoders[name])
    workdir = Path(workdir or tempfile.mkdtemp(prefix="prtool-bench-"))
    results = []
    for backend in sorted(backends, key=lambda b: b == "torch"):  # torch last: it moves the shared tower to its device
        paths = {}
        if backend != "torch":
            for name, spec in specs.items():
                paths[name] = export_variant(loaded, spec, name, workdir, calib)
        runners = {name: _runner(backend, encoders[name], paths.get(name), dev, batch_sizes, precision, cuda_graphs)
                   for name in specs}
        torch_cuda = backend == "torch" and dev.type == "cuda"
        clock = cuda_event_clock(dev) if torch_cuda else wall_clock
        h, w = loaded.preprocess["image_size"]
        for bs in batch_sizes:
            x = torch.randn(bs, 3, h, w, generator=torch.Generator().manual_seed(bs))
            feed = x.to(dev) if backend == "torch" else x.numpy().astype(np.float32)
            lat = interleaved_latency({n: (lambda r=r, f=feed: r(f)) for n, r in runners.items()}, warmup, iters, clock)
            base = lat["baseline"]["p50_ms"]
            for name, m in lat.items():
                ideal = costs["baseline"]["gmacs"] / costs[name]["gmacs"]
                speed = base / m["p50_ms"]
                results.append({"backend": backend, "device": _device_of(backend, dev.type), "batch": bs,
                                "precision": _precision_of(backend, precision), "variant": name, **m,
                                "images_per_s": bs / (m["p50_ms"] / 1000),
                                "speedup": speed, "ideal_speedup": ideal, "measured_over_ideal": speed / ideal,
                                "gmacs": costs[name]["gmacs"]})
            if "patch-ranking" in lat and "static" in lat:
                share = (lat["patch-ranking"]["p50_ms"] - lat["static"]["p50_ms"]) / lat["patch-ranking"]["p50_ms"]
                results.append({"backend": backend, "batch": bs, "variant": "machinery-share",
                                "machinery_share_of_pruned_latency": share})
    return {"model": loaded.model_id, "schedule": sched.to_dict(), "threads": torch.get_num_threads(),
            "warmup": warmup, "iters": iters, "torch_device": device_report(dev),
            "torch_precision": precision or "fp32", "cuda_graphs": cuda_graphs, "results": results}


def _precision_of(backend: str, precision: str | None) -> str:
    if backend == "torch":
        return precision or "fp32"
    return (precision or "fp16") if backend == "tensorrt" else "fp32"


def _device_of(backend: str, torch_device: str) -> str:
    if backend == "torch":
        return torch_device
    return "cuda" if backend in ("onnxruntime-cuda", "tensorrt") else "cpu"


def _torch_where(result: dict) -> str:
    dev = result.get("torch_device", {})
    where = dev.get("gpu") or dev.get("device", "cpu")
    return f"{where} in {result.get('torch_precision', 'fp32')}" + (" with CUDA graphs" if result.get("cuda_graphs")
                                                                    else "")


def markdown_table(result: dict) -> str:
    head = ["backend", "batch", "variant", "p50 ms", "p90 ms", "p99 ms", "img/s", "speedup", "ideal", "measured/ideal"]
    lines = [f"Schedule `{result['schedule']['string']}` on {result['model']['model']} "
             f"({result['model']['pretrained']}), {result['threads']} threads, {result['iters']} interleaved "
             f"iterations after {result['warmup']} warm-up; torch backend on {_torch_where(result)}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shares = []
    for r in result["results"]:
        if r["variant"] == "machinery-share":
            shares.append(f"{r['backend']} batch {r['batch']}: {100 * r['machinery_share_of_pruned_latency']:.1f}%")
            continue
        lines.append("| " + " | ".join([r["backend"], str(r["batch"]), r["variant"], f"{r['p50_ms']:.2f}",
                                        f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['images_per_s']:.1f}",
                                        f"{r['speedup']:.2f}", f"{r['ideal_speedup']:.2f}",
                                        f"{r['measured_over_ideal']:.2f}"]) + " |")
    if shares:
        lines += ["", "Pruning machinery (predictor + TopK + gather) as a share of the pruned latency, "
                  "from patch-ranking minus its static-slice twin: " + "; ".join(shares)]
    return "\n".join(lines) + "\n"
