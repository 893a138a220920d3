"""``prtool plan``'s search: in each group of schedules, the least-pruned one fast enough, then its accuracy.

A group is one method, one first block and one stage count; its schedules differ only in how many tokens
they remove. Latency falls as more are removed and accuracy, on average, falls too, so a group's best
candidate within the budget is its *edge*: the least-pruned schedule whose measured speedup meets the
budget. The analytic FLOP model, scaled by the measured-to-ideal speedup ratio of the method's groups timed
so far (ToMe's merges cost more than their FLOPs, gathers less), names the first schedule to time; galloping
then bisection over the group finds the edge in a few latency runs. Only edges are scored for accuracy, the
costly part. The edge must meet the budget with a safety margin (``--safety``): a speedup measured at the
budget's edge misses it about half the time when measured again. Afterwards the most accurate edges are timed
again, together, beside the unpruned export (:func:`confirm`): the pick must meet the budget in both runs.

Every latency and accuracy figure lands in the :class:`~prtool.bench.plan_space.PlanCache` as it is measured;
the search's decisions depend only on those figures, so a search killed and rerun retraces its steps from the
cache and measures only what it had not.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.bench.pareto import time_exports
from prtool.bench.plan_space import PLAN_METHODS, Candidate, PlanCache, weights_id
from prtool.data.zeroshot import text_classifier
from prtool.encoder.build import EncoderSpec, schedule_for
from prtool.errors import PrtoolError
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.export.quantize import QuantizeOptions, quantize_onnx
from prtool.util.files import sha256_file
from prtool.util.progress import progress_bar

log = logging.getLogger(__name__)
UNREACHABLE = 1.5  # a group whose most-pruned schedule's FLOP speedup is this far below the budget is not timed


@dataclass
class PlanSetup:
    """What every measurement of one search shares."""

    loaded: object
    calib: object | None  # the calibration ImageDataset; None with --speed-only
    predictor: Path | None
    backend: str
    batch: int
    warmup: int
    iters: int
    workdir: Path
    cache: PlanCache

    def key(self, kind: str, cand: Candidate | None = None) -> str:
        parts = {"kind": kind, **weights_id(self.loaded), "backend": self.backend, "batch": self.batch,
                 "threads": torch.get_num_threads(), "iters": self.iters}
        if cand is not None:
            parts.update(method=cand.method, schedule=cand.schedule.to_string())
            if PLAN_METHODS[cand.method].uses_predictor:
                parts["predictor_sha256"] = sha256_file(self.predictor) if self.predictor else "untrained"
        if kind == "accuracy":
            for k in ("backend", "batch", "threads", "iters"):
                parts.pop(k)
            parts["data"] = self.calib.fingerprint()
        return PlanCache.key(**parts)


def export_candidate(s: PlanSetup, cand: Candidate | None, name: str) -> Path:
    """An unvalidated export of ``cand`` (None: the unpruned FP32 encoder) in the work folder, quantized when its
    method is a quantized variant."""
    spec = cand.spec(s.predictor) if cand else EncoderSpec(schedule_for(s.loaded, "none"))
    fp32 = export_onnx(s.loaded, spec, s.workdir / f"{name}.onnx", ExportOptions(validate=False)).onnx_path
    mode = PLAN_METHODS[cand.method].quantize if cand else None
    if mode is None:
        return fp32
    out = s.workdir / f"{name}-{mode}.onnx"
    try:
        quantize_onnx(fp32, out, QuantizeOptions(mode))
    finally:
        remove_export(fp32)
    return out


def remove_export(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


class OutOfTime(Exception):
    """``--max-time`` passed before a measurement the cache lacks."""


def find_edge(n: int, meets, start: int) -> int | None:
    """The lowest index in ``range(n)`` for which ``meets`` holds, assuming it holds from some index on (None:
    nowhere). Probes ``start`` first, gallops away from it until the answer is bracketed, then bisects."""
    lo, hi, step, i = -1, n, 1, start
    while True:
        if meets(i):
            hi = i
        else:
            lo = i
        if hi - lo <= 1:
            return hi if hi < n else None
        if lo < 0:
            i = max(0, hi - step)
        elif hi >= n:
            i = min(n - 1, lo + step)
        else:
            i = (lo + hi) // 2
        step *= 2


def groups_of(candidates: list[Candidate], pred: dict) -> list[list[Candidate]]:
    """Candidates by method, first block and stage count, each group least-pruned first."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        if c.label in pred:
            groups.setdefault((c.method, c.schedule.first_block, len(c.schedule.stages)), []).append(c)
    return [sorted(g, key=lambda c: (pred[c.label]["ideal_speedup"], c.label)) for g in groups.values()]


class Search:
    """One search's measurements: cached figures are read, missing ones measured (and cached at once)."""

    def __init__(self, s: PlanSetup, pred: dict, max_time: float | None):
        self.s, self.pred, self.max_time = s, pred, max_time
        self.t0 = time.monotonic()
        self.class_emb = text_classifier(s.loaded, s.calib) if s.calib is not None else None
        self.base: Path | None = None
        self.ratios: dict[str, list[float]] = {}  # method -> measured / ideal speedups so far
        self.counts = {"latency_measured": 0, "latency_cached": 0, "accuracy_measured": 0, "accuracy_cached": 0}
        self.probes: list[dict] = []

    def _check_time(self) -> None:
        if self.max_time is not None and time.monotonic() - self.t0 > self.max_time:
            raise OutOfTime

    def speedup(self, cand: Candidate) -> float:
        """Speedup over the unpruned export, the pair timed interleaved."""
        key = self.s.key("latency", cand)
        if self.s.cache.get(key) is None:
            self._check_time()
            if self.base is None:
                self.base = export_candidate(self.s, None, "unpruned")
            path = export_candidate(self.s, cand, "candidate")
            try:
                pair = (cand.method, cand.schedule.to_string())
                lat = time_exports({("none", "none"): self.base, pair: path}, self.s.loaded, self.s.batch,
                                   self.s.warmup, self.s.iters)
            finally:
                remove_export(path)
            base_ms, ms = lat[("none", "none")]["p50_ms"], lat[pair]["p50_ms"]
            self.s.cache.put(key, {"p50_ms": ms, "base_p50_ms": base_ms, "speedup": base_ms / ms})
            self.counts["latency_measured"] += 1
        else:
            self.counts["latency_cached"] += 1
        sp = self.s.cache.get(key)["speedup"]
        self.ratios.setdefault(cand.method, []).append(sp / self.pred[cand.label]["ideal_speedup"])
        self.probes.append({"method": cand.method, "schedule": cand.schedule.to_string(), "speedup": sp,
                            "ideal_speedup": self.pred[cand.label]["ideal_speedup"]})
        return sp

    def accuracy(self, cand: Candidate) -> None:
        """Calibration top-1 of ``cand`` from its export."""
        key = self.s.key("accuracy", cand)
        if self.s.cache.get(key) is not None:
            self.counts["accuracy_cached"] += 1
            return
        self._check_time()
        path = export_candidate(self.s, cand, "candidate")
        try:
            res = evaluate_zero_shot(self.s.loaded, self.s.calib, cand.spec(self.s.predictor), onnx_path=path,
                                     class_emb=self.class_emb, compare_unpruned=False)
        finally:
            remove_export(path)
        self.s.cache.put(key, {"top1": float(res["top1"]), "images": len(self.s.calib)})
        self.counts["accuracy_measured"] += 1

    def edge(self, group: list[Candidate], target: float) -> Candidate | None:
        """The group's least-pruned candidate measured at ``target`` or faster."""
        ratio = statistics.median(self.ratios.get(group[0].method, [1.0]))
        start = min(range(len(group)),
                    key=lambda i: abs(self.pred[group[i].label]["ideal_speedup"] * ratio - target))
        i = find_edge(len(group), lambda j: self.speedup(group[j]) >= target, start)
        return None if i is None else group[i]

    def close(self) -> None:
        if self.base is not None:
            remove_export(self.base)
        if self.s.workdir.exists() and not any(self.s.workdir.iterdir()):
            self.s.workdir.rmdir()


def reachable_groups(groups: list[list[Candidate]], pred: dict, want: float) -> list[list[Candidate]]:
    """The groups whose most-pruned schedule's FLOP speedup comes within a factor ``UNREACHABLE`` of ``want``."""
    return [g for g in groups if pred[g[-1].label]["ideal_speedup"] * UNREACHABLE >= want]


def search(s: PlanSetup, candidates: list[Candidate], pred: dict, target: float, safety: float,
           max_time: float | None) -> tuple[list[Candidate], dict]:
    """Each group's edge at ``target (1 + safety)`` and, with a calibration set, its accuracy."""
    want = target * (1 + safety)
    groups = groups_of(candidates, pred)
    reachable = reachable_groups(groups, pred, want)
    if not reachable:
        raise PrtoolError(f"no schedule in the search space comes near {target:.2f}x by the FLOP model: widen "
                          "--keep-ratios or --stages, or ask for a budget nearer the unpruned latency")
    log.info("plan: %d schedules in %d groups (%d out of reach by FLOPs), target %.3fx + %.0f%% safety",
             len(candidates), len(groups), len(groups) - len(reachable), target, 100 * safety)
    run, edges, stopped = Search(s, pred, max_time), [], False
    try:
        with progress_bar(len(reachable), "plan", unit="groups") as bar:
            for g in reachable:
                e = run.edge(g, want)
                if e is not None and s.calib is not None:
                    run.accuracy(e)
                if e is not None:
                    edges.append(e)
                bar.update(1, e.label if e else f"{g[0].label}: none fast enough")
    except OutOfTime:
        stopped = True
    finally:
        run.close()
    out_of_reach = [g[-1].label for g in groups if not any(g is r for r in reachable)]
    stats = {"groups": len(groups), "groups_unreachable": len(out_of_reach), "out_of_reach": out_of_reach,
             "edges": len(edges),
             **run.counts, "stopped_early": stopped, "search_s": time.monotonic() - run.t0, "probes": run.probes}
    return edges, stats


def confirm(s: PlanSetup, rows: list[dict], target: float, top: int, key) -> None:
    """Time the ``top`` most accurate rows within the budget again, together, each beside the unpruned export in
    one interleaved run, until the best ``top`` all have a second figure (``confirmed_speedup``, cached). ``key``
    orders rows best first."""
    for r in rows:
        hit = s.cache.get(s.key("confirm", _cand(s, r)))
        if hit is not None:
            r["confirmed_speedup"] = hit["speedup"]
    while True:
        ok = sorted((r for r in rows if meets_budget(r, target)), key=key)[:top]
        todo = [r for r in ok if "confirmed_speedup" not in r]
        if not todo:
            return
        paths = {("none", "none"): export_candidate(s, None, "confirm-unpruned")}
        try:
            for i, r in enumerate(todo):
                paths[(r["method"], r["schedule"])] = export_candidate(s, _cand(s, r), f"confirm-{i}")
            lat = time_exports(paths, s.loaded, s.batch, s.warmup, s.iters)
        finally:
            for p in paths.values():
                remove_export(p)
        base = lat[("none", "none")]["p50_ms"]
        for r in todo:
            r["confirmed_speedup"] = base / lat[(r["method"], r["schedule"])]["p50_ms"]
            s.cache.put(s.key("confirm", _cand(s, r)), {"speedup": r["confirmed_speedup"], "base_p50_ms": base})


def meets_budget(row: dict, target: float) -> bool:
    """Within the budget in the search and, once timed again, in the confirmation too."""
    return row["speedup"] >= target and row.get("confirmed_speedup", row["speedup"]) >= target


def _cand(s: PlanSetup, row: dict) -> Candidate:
    return Candidate(row["method"], schedule_for(s.loaded, row["schedule"]))
