"""Side-by-side latency: every variant timed interleaved in one process, so machine noise hits all
of them alike. Quote the ratios, not the absolute times.

A clock is a callable ``clock(fn) -> milliseconds`` that runs ``fn`` once and times it. On CPU
(and for backends whose ``run`` returns only once outputs are on the host) that is the wall clock;
for PyTorch on CUDA, whose kernels run asynchronously, it is :func:`cuda_event_clock`: the queue is
drained first, then CUDA events recorded on the stream around the call time the GPU work itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

Clock = Callable[[Callable[[], object]], float]


def wall_clock(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def cuda_event_clock(device=None) -> Clock:
    """A clock for asynchronous CUDA work: ``synchronize``, record a start event, run, record an end
    event, wait for it; the time is ``start.elapsed_time(end)`` (GPU time between the two events,
    launch gaps included, host-side queueing before the first kernel excluded)."""
    import torch

    def clock(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return clock


def interleaved_latency(runners: dict[str, Callable[[], object]], warmup: int = 3, iters: int = 20,
                        clock: Clock | None = None) -> dict[str, dict]:
    """Run each runner ``warmup`` times, then ``iters`` rounds where every runner runs once per round
    (the order rotates each round), each call timed by ``clock`` (default: the wall clock). Returns
    per runner p50/p90/p99/mean latency in milliseconds."""
    clock = clock or wall_clock
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            clock(runners[n])
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            samples[n].append(clock(runners[n]))
    out = {}
    for n, s in samples.items():
        a = np.asarray(s)
        out[n] = {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
                  "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "iters": len(s)}
    return out
