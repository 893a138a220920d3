"""``prtool bench pareto``: every method over a grid of budgets, top-1 against measured speedup.

A method may carry a quantization, ``NAME+MODE`` (``patch-ranking-merge+int8-dynamic``; modes of
``prtool.export.quantize``): its export is quantized from the FP32 export of the same budget, and its row is
scored and timed from that graph like any other.

Each (method, budget) is exported to ONNX once; its top-1 is scored from that export in
onnxruntime (methods that cannot be exported, ``random-merge`` and ``golden-merge``, are scored in
PyTorch and timed by the ``patch-ranking-merge`` export of the same budget, whose graph differs
only by the ranker). Then every export runs interleaved in one process on the chosen backend,
so machine noise hits all of them alike. A point is on the Pareto front when no other point is
both faster and more accurate.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from prtool.bench.accuracy import save_figure
from prtool.bench.evaluate import evaluate_zero_shot
from prtool.data.zeroshot import text_classifier
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, method_spec, schedule_for
from prtool.encoder.flops import encoder_cost
from prtool.encoder.methods import METHODS, get_method
from prtool.encoder.schedule import Schedule
from prtool.errors import PrtoolError
from prtool.export.io_names import PIXELS
from prtool.util.stats import paired_difference
from prtool.util.timing import interleaved_latency

log = logging.getLogger(__name__)

DEFAULT_METHODS = "none,patch-ranking,patch-ranking-merge,tome,evit,random-merge"
DEFAULT_BUDGETS = "4x136,4x118,4x96,4x76,4x56,1x60%,1x50%"
_BUDGET = re.compile(r"^(\d+)x(\d+(?:\.\d+)?)(%?)$")


def parse_budgets(loaded, text: str, first_block: int | None = None) -> list[Schedule]:
    """``"4x118,1x60%"``: stages x patches kept (a count, or a percentage of N) -> schedules."""
    n = loaded.visual.grid_size[0] * loaded.visual.grid_size[1]
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        m = _BUDGET.match(part)
        if not m:
            raise PrtoolError(f"malformed budget {part!r}: write STAGESxKEEP such as 4x118 or 1x60%")
        keep = float(m.group(2)) / 100 * n if m.group(3) else float(m.group(2))
        out.append(schedule_for(loaded, keep_ratio=round(keep) / n, stages=int(m.group(1)), first_block=first_block))
    return out


def _method(name: str):
    """The table entry of a row name: ``NAME`` or a quantized ``NAME+MODE``."""
    return get_method(name.partition("+")[0], "pareto")


def _specs(methods: list[str], schedules: list[Schedule], loaded, predictor: Path | None,
           designs: dict[str, dict] | None = None) -> dict:
    """``(label, schedule) -> EncoderSpec``; each of ``designs`` adds a ``patch-ranking-merge[name]`` row."""
    specs = {("none", "none"): method_spec(METHODS["none"], schedules[0])}
    for sched in schedules:
        for m in methods:
            if _method(m).name != "none":
                specs[(m, sched.to_string())] = method_spec(_method(m), sched, predictor)
            elif "+" in m:  # the unpruned model quantized: one row, like the unpruned one
                specs[(m, "none")] = method_spec(_method(m), sched)
        for name, design in (designs or {}).items():
            specs[(f"patch-ranking-merge[{name}]", sched.to_string())] = EncoderSpec(
                sched, "patch-ranking-merge", predictor, merge=design)
    return specs


def _check_methods(methods: list[str], rankings: Path | None, calib: dict | None = None) -> dict[str, str]:
    """``{name: the method whose export times it}`` for the methods that cannot be exported, after checking
    every name, what each needs, and that each timing twin is among ``methods``."""
    from prtool.bench.quantize_bench import check_variants

    check_variants(methods, ["onnxruntime"], calib)
    given = {get_method(m, "pareto").name for m in methods if "+" not in m}
    timed_by = {}
    for m in methods:
        method = _method(m)
        if "+" in m and not method.exportable:
            raise PrtoolError(f"{m}: {method.name} cannot be exported, so it has no quantized export; "
                              f"quantize an exported method (e.g. patch-ranking-merge+{m.partition('+')[2]})")
        if method.needs == "rankings" and rankings is None:
            raise PrtoolError(f"method {m} needs --rankings DIR (rankings of the evaluated split)")
        if method.timed_by is not None and not method.exportable:
            if method.timed_by not in given:
                raise PrtoolError(f"{m} cannot be exported: it is timed by {method.timed_by}'s export: "
                                  f"add {method.timed_by} to --methods")
            timed_by[m] = method.timed_by
    return timed_by


def bench_pareto(loaded, dataset, schedules: list[Schedule], methods: list[str], predictor: Path | None = None,
                 rankings: Path | None = None, seeds: list[int] = (0,), batch: int = 32, warmup: int = 3,
                 iters: int = 20, workdir: Path | None = None, designs: dict[str, dict] | None = None,
                 calib: dict | None = None) -> dict:
    """``calib`` (``{"data", "images", "seed"}``) calibrates the ``NAME+int8-qdq`` rows."""
    timed_by = _check_methods(methods, rankings, calib)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="prtool-pareto-"))
    class_emb = text_classifier(loaded, dataset)
    specs, rows, hits, sessions = _specs(methods, schedules, loaded, predictor, designs), [], {}, {}
    for (method, sched_text), spec in specs.items():
        enc, _ = build_pruned_encoder(loaded, spec)
        row = {"method": method, "design": spec.merge, "schedule": sched_text, "keep": spec.schedule.final_keep,
               "stages": len(spec.schedule.stages), "gflops": encoder_cost(enc)["gflops"]}
        per_seed = []
        if method in timed_by:
            for seed in seeds:
                evaluate_zero_shot(loaded, dataset, EncoderSpec(spec.schedule, spec.scorer, seed=seed),
                                         class_emb=class_emb, compare_unpruned=False, hits_out=per_seed,
                                         rankings=rankings)
            row.update(accuracy_backend="torch", seeds=list(seeds), timed_by=timed_by[method])
        else:
            path = _export_row(loaded, spec, method, sched_text, workdir, calib)
            evaluate_zero_shot(loaded, dataset, spec, onnx_path=path, class_emb=class_emb,
                                     compare_unpruned=False, hits_out=per_seed)
            row.update(accuracy_backend="onnxruntime", onnx=str(path))
            sessions[(method, sched_text)] = path
        hits[(method, sched_text)] = np.mean(per_seed, axis=0)
        row["top1"] = float(100 * hits[(method, sched_text)].mean())
        rows.append(row)
    lat = time_exports(sessions, loaded, batch, warmup, iters)
    _attach(rows, hits, lat)
    return {"model": loaded.model_id, "dataset": dataset.name, "split": dataset.split, "images": len(dataset),
            "backend": "onnxruntime CPU", "batch": batch, "threads": torch.get_num_threads(), "warmup": warmup,
            "iters": iters, "rows": rows, "front": pareto_front(rows)}


def _export_row(loaded, spec, method: str, sched_text: str, workdir: Path, calib: dict | None) -> Path:
    """The unvalidated export a row is scored and timed from (quantized for ``NAME+MODE``): ``bench speed``'s
    :func:`~prtool.bench.quantize_bench.export_variant`."""
    from prtool.bench.quantize_bench import export_variant

    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{sched_text}-{method}")  # ...-NAME+MODE: the mode ends the name
    log.info("exporting %s at %s", method, sched_text)
    return export_variant(loaded, spec, stem, workdir, calib)


def time_exports(paths: dict, loaded, batch: int, warmup: int, iters: int) -> dict:
    from prtool.runtime.session import ort_session

    h, w = loaded.preprocess["image_size"]
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch)).numpy()
    runs = {key: ort_session(p) for key, p in paths.items()}
    log.info("timing %d exports interleaved (batch %d, %d iterations)", len(runs), batch, iters)
    names = {f"{m}@{s}": (m, s) for (m, s) in runs}
    lat = interleaved_latency({n: (lambda s=runs[k]: s.run(None, {PIXELS: x})) for n, k in names.items()},
                              warmup, iters)
    return {names[n]: v for n, v in lat.items()}


def _attach(rows: list[dict], hits: dict, lat: dict) -> None:
    """Speedups vs the unpruned export, the ideal FLOP ratio, and paired top-1 differences against
    Patch Ranking and ToMe at the same schedule (with the ratio of their measured speedups)."""
    base = lat[("none", "none")]["p50_ms"]
    base_gflops = next(r["gflops"] for r in rows if r["method"] == "none")
    for r in rows:
        r["p50_ms"] = lat[(r.get("timed_by", r["method"]), r["schedule"])]["p50_ms"]
        r["speedup"] = base / r["p50_ms"]
        r["ideal_speedup"] = base_gflops / r["gflops"]
    by = {(r["method"], r["schedule"]): r for r in rows}
    for r in rows:
        for ref in ("patch-ranking", "tome", "patch-ranking-merge"):
            other = by.get((ref, r["schedule"]))
            if other is not None and other is not r:
                diff, se = paired_difference(hits[(r["method"], r["schedule"])], hits[(ref, r["schedule"])])
                r[f"vs_{ref}"] = {"top1_diff": diff, "se": se, "speedup_ratio": r["speedup"] / other["speedup"]}


def load_report(path: Path) -> dict:
    """A ``pareto.json`` written by ``prtool bench pareto``."""
    import json

    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PrtoolError(f"cannot read pareto report {path} ({exc.__class__.__name__}): pass a pareto.json "
                          "written by `prtool bench pareto`") from None
    if not isinstance(result, dict) or "rows" not in result or "front" not in result:
        raise PrtoolError(f"{path} is not a pareto report: pass a pareto.json written by `prtool bench pareto`")
    return result


def combine_results(results: list[dict]) -> dict:
    """One report from several ``bench pareto`` runs of the same model and images (e.g. one run per
    budget, each timed against its own unpruned export): rows concatenated, one unpruned row kept,
    the front recomputed. Each row keeps the index of the run that timed it."""
    if not results:
        raise PrtoolError("nothing to combine: pass --combine with pareto.json files")
    first = results[0]
    for r in results[1:]:
        if (r["model"], r["dataset"], r["split"], r["images"], r["batch"]) != \
                (first["model"], first["dataset"], first["split"], first["images"], first["batch"]):
            raise PrtoolError("--combine needs runs of one model, dataset, split, image count and batch size")
    rows, seen = [], set()
    for i, res in enumerate(results):
        for row in res["rows"]:
            key = (row["method"], row["schedule"])
            if key not in seen:
                seen.add(key)
                rows.append({**row, "run": i})
    out = {**first, "rows": rows, "front": pareto_front(rows), "runs": len(results),
           "iters": min(r["iters"] for r in results)}
    out["backend"] = f"{first['backend']}, one interleaved run per budget"
    return out


def pareto_front(rows: list[dict]) -> list[str]:
    """Labels ``method@schedule`` of the points no other point beats on both speedup and top-1."""
    front = []
    for r in rows:
        if not any(o is not r and o["speedup"] >= r["speedup"] and o["top1"] >= r["top1"]
                   and (o["speedup"] > r["speedup"] or o["top1"] > r["top1"]) for o in rows):
            front.append(f"{r['method']}@{r['schedule']}")
    return front


def _label(r: dict) -> str:
    return f"{r['method']}@{r['schedule']}"


def markdown_table(result: dict) -> str:
    head = ["method", "schedule", "keep", "top-1 %", "GFLOPs", "p50 ms", "speedup", "ideal", "front",
            "Δ top-1 vs ToMe (paired SE)", "speedup / ToMe's", "Δ top-1 vs Patch Ranking", "Δ top-1 vs rank-and-merge"]
    front = set(result["front"])
    lines = [f"Zero-shot top-1 on {result['dataset']}/{result['split']} ({result['images']} images) from the ONNX "
             f"exports, model {result['model']['model']} ({result['model']['pretrained']}); latency "
             f"{result['backend']}, batch {result['batch']}, {result['threads']} threads, every export interleaved "
             f"({result['iters']} iterations after {result['warmup']} warm-up).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        t, p, m = r.get("vs_tome"), r.get("vs_patch-ranking"), r.get("vs_patch-ranking-merge")
        top1 = f"{r['top1']:.2f}" + (" (torch)" if r.get("accuracy_backend") == "torch" else "")
        lines.append("| " + " | ".join([
            r["method"], r["schedule"], str(r["keep"]), top1, f"{r['gflops']:.3f}", f"{r['p50_ms']:.1f}",
            f"{r['speedup']:.2f}" + (f" (= {r['timed_by']})" if r.get("timed_by") else ""),
            f"{r['ideal_speedup']:.2f}", "**yes**" if _label(r) in front else "",
            f"{t['top1_diff']:+.2f} ± {t['se']:.2f}" if t else "-", f"{t['speedup_ratio']:.3f}" if t else "-",
            f"{p['top1_diff']:+.2f} ± {p['se']:.2f}" if p else "-",
            f"{m['top1_diff']:+.2f} ± {m['se']:.2f}" if m else "-"]) + " |")
    lines += ["", "Front: no other point is both faster and more accurate. Rows marked (torch) cannot be exported "
              "(random or oracle ranking): scored in PyTorch, timed by the patch-ranking-merge export of the same "
              "budget. ± is the standard error of the per-image paired difference."]
    return "\n".join(lines) + "\n"


def plot_pareto(result: dict, path: Path) -> None:
    """Top-1 vs measured speedup, one colour per method, every point labelled by its kept patches,
    the Pareto front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = [r for r in result["rows"] if r["method"] == m]
        ax.scatter([r["speedup"] for r in pts], [r["top1"] for r in pts], label=m, s=28, zorder=3)
        for r in pts:
            tag = "unpruned" if m == "none" else f"{r['keep']}" + ("" if r["stages"] > 1 else " (1 stage)")
            ax.annotate(tag, (r["speedup"], r["top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in result["rows"] if _label(r) in set(result["front"])), key=lambda r: r["speedup"])
    ax.step([r["speedup"] for r in front], [r["top1"] for r in front], where="pre", color="black", lw=1,
            ls="--", label="Pareto front", zorder=2)
    ax.set_xlabel(f"measured speedup vs unpruned ({result['backend']}, batch {result['batch']})")
    ax.set_ylabel("zero-shot top-1 % (ONNX export)")
    ax.set_title(f"{result['model']['model']} on {result['dataset']}/{result['split']}: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=130)
