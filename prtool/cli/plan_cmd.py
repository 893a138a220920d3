"""``prtool plan``: search methods x schedules for the most accurate export within a latency budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_inputs, check_output, emit, setup, table

# plan_space.PLAN_METHODS has every method and its int8-dynamic variant; by default the FP32 four and the int8 variants
# of the two strongest (each method searched costs its share of the search time)
_METHODS = "patch-ranking,patch-ranking-merge,tome,evit,patch-ranking-merge+int8-dynamic,tome+int8-dynamic"
_KEEPS = ",".join(f"{k / 1000:.3f}" for k in range(300, 976, 25))  # 0.300, 0.325, ... 0.975


def plan(
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    image_root: o.ImageRoot = None,
    budget_ms: Annotated[float | None, typer.Option(
        "--budget-ms",
        help="Latency budget: ms per batch on --backend.")] = None,
    speedup: Annotated[float | None, typer.Option(
        "--speedup",
        help="Budget as a speedup over the unpruned export (e.g. 1.3).")] = None,
    backend: Annotated[str, typer.Option(
        "--backend",
        help="Where latency is measured: onnxruntime-cpu.")] = "onnxruntime-cpu",
    batch: Annotated[int, typer.Option("--batch", help="Batch size of the latency runs.")] = 32,
    methods: Annotated[str, typer.Option(
        "--methods",
        help="Comma-separated: patch-ranking, patch-ranking-merge, tome, evit, each also as NAME+int8-dynamic "
             "(the export quantized).")] = _METHODS,
    stages: Annotated[str, typer.Option("--stages", help="Stage counts to search (comma-separated).")] = "1,2,3,4",
    keep_ratios: Annotated[str, typer.Option(
        "--keep-ratios",
        help="Fractions of patches kept to search (comma-separated).")] = _KEEPS,
    safety: Annotated[float, typer.Option(
        "--safety",
        help="Margin over the budget a candidate must show in the search (0.03: 3% faster than asked).")] = 0.03,
    confirm: Annotated[int, typer.Option(
        "--confirm",
        help="The most accurate candidates within the budget timed again, together; the pick must meet the "
             "budget in both runs.")] = 3,
    predictor: o.PredictorPath = None,
    calib_split: Annotated[str, typer.Option(
        "--calib-split",
        help="Split the candidates' accuracy is measured on (not the report split).")] = "val",
    calib_limit: Annotated[int | None, typer.Option(
        "--calib-limit",
        help="Seeded random subset of the calibration split.")] = 1000,
    seed: o.Seed = 0,
    report_split: Annotated[str | None, typer.Option(
        "--report-split",
        help="Afterwards, score the pick and --reference candidates on this split, timed side by side.")] = None,
    reference: Annotated[list[str] | None, typer.Option(
        "--reference",
        help="METHOD@SCHEDULE compared with the pick on --report-split (repeatable).")] = None,
    compare: Annotated[str | None, typer.Option(
        "--compare",
        help="Methods whose best candidate within the budget is compared with the pick on --report-split "
             "(default: every other searched method).")] = None,
    speed_only: Annotated[bool, typer.Option(
        "--speed-only",
        help="No accuracy (e.g. random weights): pick the candidate within the budget that prunes least.")] = False,
    max_time: Annotated[float | None, typer.Option(
        "--max-time",
        help="Stop measuring after this many seconds and report what was measured.")] = None,
    warmup: Annotated[int, typer.Option("--warmup")] = 3,
    iters: Annotated[int, typer.Option("--iters", help="Timed interleaved iterations per candidate.")] = 20,
    cache: Annotated[Path | None, typer.Option(
        "--cache",
        help="Measurement cache (JSON; default OUT/cache.json): reruns reuse it.")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o",
        help="Report folder: plan.json/md/png, pick/model.onnx + manifest.")] = Path("runs/plan"),
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Search methods x schedules on the backend and a calibration split; export the most accurate in the budget."""
    setup(quiet, verbose)
    budget = _check_args(budget_ms, speedup, backend, batch, safety, confirm, max_time, calib_split, report_split,
                         speed_only, iters)
    check_output(out, "dir")
    check_output(cache or out / "cache.json", "file", "--cache")
    check_inputs(predictor)
    from prtool.bench import plan as pl
    from prtool.bench import plan_space as ps

    cache = ps.PlanCache(cache or out / "cache.json")  # a wrong file is refused before the model loads

    method_list = ps.parse_methods(methods)
    stage_list = ps.parse_numbers(stages, "--stages", int, 0, 1000)
    keeps = ps.parse_numbers(keep_ratios, "--keep-ratios", float, 0.0, 1.0)
    result = _run(pl, ps, locals(), budget, method_list, stage_list, keeps)
    emit(result, as_json, lambda r: _print(r, out))


def _check_args(budget_ms, speedup, backend, batch, safety, confirm, max_time, calib_split, report_split,
                speed_only, iters) -> dict:
    """Everything checkable before a model loads, so bad input costs nothing and writes nothing."""
    from prtool.bench.plan_space import BACKENDS
    from prtool.errors import PrtoolError

    if (budget_ms is None) == (speedup is None):
        raise PrtoolError("give exactly one budget: --budget-ms X (ms per batch) or --speedup S (e.g. 1.3)")
    if speedup is not None and speedup <= 1.0:
        raise PrtoolError(f"--speedup {speedup} must be above 1 (1 is the unpruned model)")
    if budget_ms is not None and budget_ms <= 0:
        raise PrtoolError(f"--budget-ms {budget_ms} must be positive")
    if backend not in BACKENDS:
        raise PrtoolError(f"--backend {backend!r}: plan measures on {', '.join(BACKENDS)}")
    if batch < 1 or confirm < 1 or iters < 1 or not 0 <= safety < 1:
        raise PrtoolError("--batch, --confirm and --iters must be at least 1, --safety in [0, 1)")
    if max_time is not None and max_time <= 0:
        raise PrtoolError(f"--max-time {max_time} must be positive (seconds)")
    if report_split is not None and (report_split == calib_split or speed_only):
        raise PrtoolError(f"--report-split {report_split} must differ from --calib-split {calib_split} (the "
                          "calibration split chose the pick) and needs accuracy (not --speed-only)")
    return {"speedup": speedup} if speedup is not None else {"ms": budget_ms}


def _run(pl, ps, a: dict, budget: dict, methods: list[str], stages: list[int], keeps: list[float]) -> dict:
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import schedule_for
    from prtool.encoder.models import load_clip
    from prtool.errors import PrtoolError
    from prtool.runtime.envinfo import collect_env
    from prtool.util.files import write_json_atomic

    loaded = load_clip(a["model"], a["pretrained"])
    pred, rank_block = pl.plan_predictor(loaded, a["predictor"], methods, a["speed_only"])
    calib = None
    if not a["speed_only"]:
        calib = pl.calibration_subset(load_dataset(a["data"], a["calib_split"], a["image_root"]), a["calib_limit"],
                                      a["seed"])
    out: Path = a["out"]
    setup_ = pl.PlanSetup(loaded, calib, pred, a["backend"], a["batch"], a["warmup"], a["iters"], out / "work",
                          a["cache"])
    space = {"methods": methods, "stages": stages, "keep_ratios": keeps, "rank_block": rank_block,
             "safety": a["safety"], "confirm": a["confirm"], "predictor": str(pred) if pred else None}
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = pl.run_plan(setup_, ps.search_space(loaded, methods, stages, keeps, rank_block), budget, space,
                             a["max_time"])
    except PrtoolError:
        if fresh and not any(out.iterdir()):  # refused before measuring anything: leave no empty folder behind
            out.rmdir()
        raise
    if calib is not None:
        result["calibration"] = {"dataset": calib.name, "split": calib.split, "images": len(calib),
                                 "seed": a["seed"], "fingerprint": calib.fingerprint()}
    result["environment"] = collect_env()
    if result["pick"] is not None:
        result["export"] = pl.export_pick(setup_, result, out / "pick" / "model.onnx")
        if a["report_split"]:
            others = ps.parse_methods(a["compare"]) if a["compare"] else methods
            rows = [result["pick"], *pl.best_per_method(result["rows"], result["pick"], others)]
            cands = [ps.Candidate(r["method"], schedule_for(loaded, r["schedule"])) for r in rows]
            cands += pl.reference_candidates(loaded, a["reference"] or [])
            result["report"] = pl.verify(setup_, cands, load_dataset(a["data"], a["report_split"], a["image_root"]))
            result["report"]["none_in_budget"] = [m for m in others if m != result["pick"]["method"]
                                                  and not any(r["method"] == m for r in rows)]
    if setup_.workdir.exists() and not any(setup_.workdir.iterdir()):  # the candidates' exports are gone
        setup_.workdir.rmdir()
    _write(pl, out, result, write_json_atomic)
    if result["pick"] is None:  # a search that ran is a result: the front is reported, the missing pick said
        logging.getLogger("prtool.bench.plan").warning(
            "warning: no measured candidate met the budget, nothing exported: raise the budget, widen --keep-ratios/"
            "--stages" + (" or give a larger --max-time" if result["stopped_early"] else ""))
    return result


def _write(pl, out: Path, result: dict, write_json_atomic) -> None:
    from prtool.bench.pareto import plot_pareto

    write_json_atomic(out / "plan.json", result)
    (out / "plan.md").write_text(pl.plan_markdown(result))
    if result["front"]:
        plot_pareto(pl.for_writers(result), out / "plan.png")
    if "report" in result:
        (out / "report.md").write_text(pl.verify_markdown(result["report"]))


def _print(r: dict, out: Path) -> None:
    from prtool.bench.plan import search_summary

    rows = [(x["method"], x["schedule"], x["keep"], x["top1"], f"{x['speedup']:.3f}",
             f"{x['confirmed_speedup']:.3f}" if "confirmed_speedup" in x else "-", f"{x['ideal_speedup']:.3f}",
             x["within_budget"], f"{x['method']}@{x['schedule']}" in r["front"]) for x in r["rows"]]
    table(f"plan: budget {r['budget']['speedup']:.3f}x, calibration {r['split']} ({r['images']} images)",
          ["method", "schedule", "keep", "top-1 %", "speedup", "again", "ideal", "in budget", "front"], rows)
    p = r["pick"]
    top1 = "speed only" if p is None or p["top1"] is None else f"{p['top1']:.2f}%"
    what = f"{p['method']} {p['schedule']} ({p['speedup']:.3f}x measured, top-1 {top1})" if p else "none in budget"
    print(f"pick: {what}")
    print(search_summary(r).replace("**", ""))
    if "report" in r:
        for x in r["report"]["rows"]:
            print(f"report split {r['report']['split']}: {x['role']} {x['method']} {x['schedule']}: "
                  f"top-1 {x['top1']:.2f}%, {x['speedup']:.3f}x")
        for m in r["report"]["none_in_budget"]:
            print(f"report split {r['report']['split']}: no {m} candidate met the budget in the search")
    print((f"export {r['export']['onnx']}; " if "export" in r else "") + f"report in {out}/plan.md")
