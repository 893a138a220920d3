"""``prtool plan``: the most accurate export that fits a latency budget on the user's runtime.

The space (:mod:`prtool.bench.plan_space`) is methods x schedules; :mod:`prtool.bench.plan_search` finds, per
method, first block and stage count, the least-pruned schedule whose latency, measured on the backend
interleaved with the unpruned export (the pair shares the machine's noise: the speedup is their ratio), meets
the budget with a safety margin, and scores it from its export on a seeded calibration subset of a split other
than the one final figures are reported on. The most accurate of those are timed once more, together; the
pick is the most accurate candidate within the budget in both runs. Every figure is cached
(:class:`prtool.bench.plan_space.PlanCache`), so a killed search rerun measures only what is missing.
``--speed-only`` (no labelled data, e.g. random weights) picks the one within the budget that prunes least.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.bench.pareto import pareto_front, time_exports
from prtool.bench.plan_search import PlanSetup, confirm, export_candidate, meets_budget, remove_export, search
from prtool.bench.plan_space import BACKENDS, PLAN_METHODS, Candidate, predicted
from prtool.data.zeroshot import text_classifier
from prtool.encoder.build import schedule_for, tower_geometry
from prtool.encoder.schedule import default_first_block
from prtool.errors import PrtoolError
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.export.quantize import QuantizeOptions, export_quantized
from prtool.util.stats import paired_difference

log = logging.getLogger(__name__)


def plan_predictor(loaded, predictor: Path | None, methods: list[str], speed_only: bool) -> tuple[Path | None, int]:
    """The predictor the predictor methods rank with and its rank block (their first stage's block)."""
    import json

    from prtool.encoder.build import resolve_predictor
    from prtool.encoder.predictor import load_predictor
    from prtool.testbed import spec as tbspec

    _, depth, _ = tower_geometry(loaded)
    if predictor is not None:
        return predictor, int(load_predictor(predictor)[1]["rank_block"])
    block = default_first_block(depth)
    if tbspec.PREDICTOR_PATH.exists():
        block = int(json.loads(tbspec.PREDICTOR_PATH.with_suffix(".json").read_text())["rank_block"])
    if not any(PLAN_METHODS[m].uses_predictor for m in methods):
        return None, block
    found = resolve_predictor(loaded, schedule_for(loaded, f"{block}:1"), "predictor", None)
    if found is None and not speed_only:
        raise PrtoolError("patch-ranking and patch-ranking-merge need a trained --predictor for accuracy: pass "
                          "--predictor FILE (from `prtool train`), drop them from --methods, or add --speed-only")
    return found, block if found is not None else default_first_block(depth)


def calibration_subset(dataset, limit: int | None, seed: int):
    """A seeded random subset of ``limit`` images (all of them when ``limit`` is None or larger)."""
    if limit is None or limit >= len(dataset):
        return dataset
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return dataset.subset(rows)


def baseline_latency(s: PlanSetup, base: Path) -> float:
    """p50 ms of the unpruned export alone (cached): turns ``--budget-ms`` into a speedup."""
    key = s.key("baseline")
    if s.cache.get(key) is None:
        lat = time_exports({("none", "none"): base}, s.loaded, s.batch, s.warmup, s.iters)[("none", "none")]
        s.cache.put(key, {"p50_ms": lat["p50_ms"]})
    return s.cache.get(key)["p50_ms"]


def row_of(s: PlanSetup, cand: Candidate, pred: dict) -> dict | None:
    """The candidate's row in ``bench pareto``'s format, or None when the cache lacks it."""
    lat = s.cache.get(s.key("latency", cand))
    acc = s.cache.get(s.key("accuracy", cand)) if s.calib is not None else {"top1": None}
    if lat is None or acc is None:
        return None
    sched = cand.schedule
    return {"method": cand.method, "design": None, "schedule": sched.to_string(), "keep": sched.final_keep,
            "stages": len(sched.stages), "gflops": pred["gflops"], "ideal_speedup": pred["ideal_speedup"],
            "top1": acc["top1"], "p50_ms": lat["p50_ms"], "base_p50_ms": lat["base_p50_ms"],
            "speedup": lat["speedup"]}


def rank_key(r: dict):
    """Best first: the most accurate (ties: the faster); without accuracy, the one that prunes least."""
    if r["top1"] is None:
        return (-r["gflops"], -r["speedup"])
    return (-r["top1"], -r["speedup"])


def pick(rows: list[dict], target: float) -> dict | None:
    """The best row (:func:`rank_key`) within the budget, in the search and in its confirmation if it has one."""
    ok = [r for r in rows if meets_budget(r, target)]
    return min(ok, key=rank_key) if ok else None


def best_per_method(rows: list[dict], chosen: dict, methods: list[str]) -> list[dict]:
    """The most accurate row within the budget of each of ``methods`` other than the pick's."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["within_budget"] and r["method"] != chosen["method"] and r["method"] in methods:
            if r["method"] not in best or r["top1"] > best[r["method"]]["top1"]:
                best[r["method"]] = r
    return list(best.values())


def _target(s: PlanSetup, budget: dict) -> tuple[float, dict]:
    """The budget as a speedup: ``--budget-ms`` over the unpruned latency measured first (cached)."""
    if budget.get("speedup") is not None:
        return budget["speedup"], budget
    base = export_candidate(s, None, "unpruned")
    try:
        base_ms = baseline_latency(s, base)
    finally:
        remove_export(base)
    return base_ms / budget["ms"], {**budget, "unpruned_p50_ms": base_ms, "speedup": base_ms / budget["ms"]}


def run_plan(s: PlanSetup, candidates: list[Candidate], budget: dict, space: dict, max_time: float | None) -> dict:
    """The whole search: target speedup, each group's edge and its accuracy, confirmation, front and pick."""
    base_gflops, pred = predicted(s.loaded, candidates)
    target, budget = _target(s, budget)
    edges, stats = search(s, candidates, pred, target, space["safety"], max_time)
    rows = [r for c in edges if (r := row_of(s, c, pred[c.label])) is not None]
    if not stats["stopped_early"]:
        confirm(s, rows, target, space["confirm"], rank_key)
    for r in rows:
        r["within_budget"] = meets_budget(r, target)
        if "unpruned_p50_ms" in budget:  # the ms budget is met through the paired speedup
            r["predicted_ms"] = budget["unpruned_p50_ms"] / min(r["speedup"], r.get("confirmed_speedup", math.inf))
    chosen = pick(rows, target)
    front_rows = [r for r in rows if r["top1"] is not None]
    calib = s.calib
    return {"model": s.loaded.model_id, "dataset": calib.name if calib else "none (speed only)",
            "split": calib.split if calib else "-", "images": len(calib) if calib else 0,
            "backend": BACKENDS[s.backend] + ", each candidate interleaved with the unpruned export",
            "batch": s.batch, "threads": torch.get_num_threads(), "warmup": s.warmup,
            "iters": s.iters, "budget": budget, "unpruned_gflops": base_gflops, "candidates": len(candidates),
            "search_space": space, **stats, "rows": rows,
            "front": pareto_front(front_rows) if front_rows else [], "pick": chosen}


def export_pick(s: PlanSetup, result: dict, out: Path) -> dict:
    """The pick through the export path (validated), its manifest recording the plan."""
    row = result["pick"]
    cand = Candidate(row["method"], schedule_for(s.loaded, row["schedule"]))
    extra = {"plan": {"budget": result["budget"], "backend": s.backend, "batch": s.batch,
                      "measured": {k: row[k] for k in ("p50_ms", "base_p50_ms", "speedup")},
                      "calibration": result.get("calibration"), "calibration_top1": row["top1"],
                      "search_space": result["search_space"]}}
    mode = PLAN_METHODS[cand.method].quantize
    if mode is None:
        res = export_onnx(s.loaded, cand.spec(s.predictor), out, ExportOptions(), extra_manifest=extra)
    else:
        res = export_quantized(s.loaded, cand.spec(s.predictor), out, ExportOptions(), QuantizeOptions(mode),
                               extra_manifest=extra)
    return {"onnx": str(res.onnx_path), "manifest": str(res.manifest_path)}


def reference_candidates(loaded, texts: list[str]) -> list[Candidate]:
    """``METHOD@SCHEDULE`` (e.g. ``patch-ranking@1:20,2:20,3:20,4:20``) -> candidates."""
    out = []
    for t in texts:
        method, _, sched = t.partition("@")
        if method not in PLAN_METHODS or not sched:
            raise PrtoolError(f"--reference {t!r}: write METHOD@SCHEDULE with METHOD one of {', '.join(PLAN_METHODS)}")
        out.append(Candidate(method, schedule_for(loaded, sched)))
    return out


def verify(s: PlanSetup, cands: list[Candidate], dataset) -> dict:
    """Top-1 of each candidate on ``dataset`` (the report split) from its export, all timed interleaved
    with the unpruned export in one run; the first candidate is the pick, the others are compared to it."""
    class_emb = text_classifier(s.loaded, dataset)
    paths, hits, rows = {("none", "none"): export_candidate(s, None, "verify-unpruned")}, {}, []
    _, pred = predicted(s.loaded, cands)
    try:
        for i, c in enumerate(cands):
            paths[(c.method, c.schedule.to_string())] = path = export_candidate(s, c, f"verify-{i}")
            per = []
            evaluate_zero_shot(s.loaded, dataset, c.spec(s.predictor), onnx_path=path, class_emb=class_emb,
                               compare_unpruned=False, hits_out=per)
            hits[c.label] = np.mean(per, axis=0)
        lat = time_exports(paths, s.loaded, s.batch, s.warmup, s.iters)
    finally:
        for p in paths.values():
            remove_export(p)
    base = lat[("none", "none")]["p50_ms"]
    for i, c in enumerate(cands):
        ms = lat[(c.method, c.schedule.to_string())]["p50_ms"]
        diff, se = paired_difference(hits[cands[0].label], hits[c.label])
        rows.append({"method": c.method, "design": None, "schedule": c.schedule.to_string(),
                     "keep": c.schedule.final_keep, "stages": len(c.schedule.stages), "role": "pick" if i == 0 else
                     "reference", "top1": float(100 * hits[c.label].mean()), "p50_ms": ms, "speedup": base / ms,
                     **pred[c.label], "pick_minus_this": {"top1_diff": diff, "se": se}})
    return {"model": s.loaded.model_id, "dataset": dataset.name, "split": dataset.split, "images": len(dataset),
            "backend": BACKENDS[s.backend], "batch": s.batch, "threads": torch.get_num_threads(),
            "warmup": s.warmup, "iters": s.iters, "unpruned_p50_ms": base, "rows": rows, "front": pareto_front(rows)}


def for_writers(result: dict) -> dict:
    """A copy ``bench pareto``'s markdown and plot accept: a missing top-1 (speed only) becomes NaN."""
    rows = [{**r, "top1": math.nan if r["top1"] is None else r["top1"]} for r in result["rows"]]
    return {**result, "rows": rows}


def search_summary(r: dict) -> str:
    """One line: groups searched, latency and accuracy runs measured and cached, whether --max-time stopped it."""
    return (f"Search: {r['candidates']} schedules in {r['groups']} groups ({r['groups_unreachable']} out of reach by "
            f"the FLOP model), {r['edges']} edges found with {r['latency_measured']} latency runs "
            f"({r['latency_cached']} cached) and {r['accuracy_measured']} accuracy runs ({r['accuracy_cached']} "
            f"cached), safety {100 * r['search_space']['safety']:.0f}%"
            + (", **stopped by --max-time**" if r["stopped_early"] else "") + f" ({r['search_s']:.0f} s).")


def plan_markdown(result: dict) -> str:
    """The plan's budget, pick and search, then its measured candidates in ``bench pareto``'s table."""
    from prtool.bench.pareto import markdown_table

    b, p = result["budget"], result["pick"]
    want = f"{b['speedup']:.3f}x speedup"
    if b.get("ms"):
        want = (f"{b['ms']} ms per batch: {b['speedup']:.3f}x over the unpruned {b['unpruned_p50_ms']:.1f} ms "
                "measured first; a candidate meets it when its speedup, measured beside the unpruned export, does")
    lines = [f"# prtool plan: budget {want}", "", search_summary(result), ""]
    if p is None:
        lines.append("**No measured candidate met the budget.**")
    else:
        acc = "calibration top-1 " + (f"{p['top1']:.2f}%" if p["top1"] is not None else "not measured (speed only)")
        again = f", {p['confirmed_speedup']:.3f}x timed again" if "confirmed_speedup" in p else ""
        lines.append(f"Pick: **{p['method']} `{p['schedule']}`**, measured {p['speedup']:.3f}x "
                     f"({p['p50_ms']:.1f} ms vs {p['base_p50_ms']:.1f} ms unpruned, side by side){again}, {acc}.")
    confirmed = [r for r in result["rows"] if "confirmed_speedup" in r]
    if confirmed:
        lines += ["", "Timed again, together (the pick must meet the budget in both runs): " + "; ".join(
            f"{r['method']} `{r['schedule']}` {r['speedup']:.3f}x then {r['confirmed_speedup']:.3f}x"
            + ("" if r["within_budget"] else " (misses)") for r in confirmed) + "."]
    return "\n".join(lines) + "\n\n" + markdown_table(for_writers(result))


def verify_markdown(report: dict) -> str:
    from prtool.bench.pareto import markdown_table

    lines = ["| role | method | schedule | top-1 % | speedup | pick minus this (paired SE) |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        d = r["pick_minus_this"]
        lines.append(f"| {r['role']} | {r['method']} | {r['schedule']} | {r['top1']:.2f} | {r['speedup']:.3f} | "
                     f"{d['top1_diff']:+.2f} ± {d['se']:.2f} |")
    lines += [f"| best {m} | no {m} candidate met the budget in the search | | | | |"
              for m in report.get("none_in_budget", [])]
    return "\n".join(lines) + "\n\n" + markdown_table(report)
