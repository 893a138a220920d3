"""Side-by-side latency: every variant timed interleaved in one process, so machine noise hits all
of them alike. Quote the ratios, not the absolute times."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def interleaved_latency(runners: dict[str, Callable[[], object]], warmup: int = 3, iters: int = 20,
                        sync: Callable[[], None] | None = None) -> dict[str, dict]:
    """Run each runner ``warmup`` times, then ``iters`` rounds where every runner runs once per round
    (the order rotates each round). Returns per runner p50/p90/p99/mean latency in milliseconds."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            if sync:
                sync()
            t0 = time.perf_counter()
            runners[n]()
            if sync:
                sync()
            samples[n].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for n, s in samples.items():
        a = np.asarray(s)
        out[n] = {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
                  "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "iters": len(s)}
    return out
