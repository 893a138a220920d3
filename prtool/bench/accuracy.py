"""``prtool bench accuracy``: every method at the same schedule, scored alike.

Methods: every scored entry of ``prtool.encoder.methods`` (``none``: unpruned; ``patch-ranking``; the oracle
``golden``, from a rankings store of the evaluated split; ``random``, mean over seeds; the peers; the
rank-and-merge variants). Each row reports zero-shot top-1/top-5, the mean cosine to the
unpruned embedding, top-1 agreement with the unpruned prediction, and analytic GFLOPs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.data.zeroshot import text_classifier
from prtool.encoder.build import build_pruned_encoder, method_spec
from prtool.encoder.flops import encoder_cost
from prtool.encoder.methods import METHODS, get_method
from prtool.encoder.schedule import Schedule
from prtool.errors import PrtoolError
from prtool.util.stats import mean_and_stderr, paired_difference

log = logging.getLogger(__name__)

def _resolve(methods: list[str], predictor: Path | None, rankings: Path | None) -> dict:
    """``{name given: Method}`` for the pruned rows (the unpruned row is always measured), after checking
    that what each needs was given."""
    out = {}
    for name in methods:
        method = get_method(name, "accuracy")
        if method.needs == "predictor" and predictor is None:
            raise PrtoolError(f"method {name} needs --predictor FILE")
        if method.needs == "rankings" and rankings is None:
            raise PrtoolError(f"method {name} needs --rankings DIR (rankings of the evaluated split)")
        if method.name != "none":
            out[name] = method
    return out


def bench_accuracy(loaded, dataset, schedules: list[Schedule], methods: list[str], predictor: Path | None = None,
                   rankings: Path | None = None, seeds: list[int] = (0, 1, 2), batch_size: int = 64,
                   quantize: dict | None = None) -> dict:
    """Rows labelled by the method names given (``prtool.encoder.methods``; the unpruned row is ``none``). ``quantize``
    (``{"modes", "calib", "workdir"}``, prtool.bench.quantize_bench) adds ONNX rows ``method+mode``."""
    pruned = _resolve(methods, predictor, rankings)
    class_emb = text_classifier(loaded, dataset)
    # The unpruned row is always measured: it anchors every comparison.
    unpruned = method_spec(METHODS["none"], schedules[0])
    enc, _ = build_pruned_encoder(loaded, unpruned)
    base_hits: list = []
    baseline = evaluate_zero_shot(loaded, dataset, unpruned, class_emb=class_emb, batch_size=batch_size,
                                  hits_out=base_hits)
    rows = [_row("none", unpruned.schedule, baseline, encoder_cost(enc))]
    hits = {("none", "none"): base_hits[0]}
    for sched in schedules:
        for name, method in pruned.items():
            spec_seeds = seeds if method.seeded else [0]
            results, seed_hits = [], []
            for seed in spec_seeds:
                log.info("%s at %s (seed %d)", name, sched.to_string(), seed)
                results.append(evaluate_zero_shot(loaded, dataset, method_spec(method, sched, predictor, seed),
                                                  class_emb=class_emb, batch_size=batch_size,
                                                  rankings=rankings if method.needs == "rankings" else None,
                                                  hits_out=seed_hits))
            hits[(name, sched.to_string())] = np.mean(seed_hits, axis=0)  # per image; mean over seeds
            enc, _ = build_pruned_encoder(loaded, method_spec(method, sched, predictor))
            rows.append(_row(name, sched, _merge(results), encoder_cost(enc), seeds=list(spec_seeds)))
    _add_paired(rows, hits)
    if quantize:  # after _add_paired: quantized rows pair with their own method's FP32 row
        from prtool.bench.quantize_bench import add_quantized_rows

        add_quantized_rows(rows, hits, loaded, dataset, class_emb, schedules,
                           pruned, predictor=predictor,
                           batch_size=batch_size, **quantize)
    return {"model": loaded.model_id, "dataset": dataset.name, "split": dataset.split, "images": len(dataset),
            "rows": rows}


def _add_paired(rows: list[dict], hits: dict) -> None:
    """Each row's top-1 minus Patch Ranking's (or, without it, the unpruned model's) at its schedule,
    paired over the same images, with the standard error of that difference."""
    for r in rows:
        ref = "patch-ranking" if ("patch-ranking", r["schedule"]) in hits else "none"
        key = (ref, r["schedule"] if ref != "none" else "none")
        if r["method"] == ref or key not in hits:
            continue
        diff, se = paired_difference(hits[(r["method"], r["schedule"])], hits[key])
        r["paired_vs"], r["paired_diff"], r["paired_se"] = ref, diff, se


def _merge(results: list[dict]) -> dict:
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for key in ("top1", "top5", "mean_cosine_to_reference", "top1_agreement_with_reference"):
        vals = [r[key] for r in results if key in r]
        if vals:
            out[key], out[f"{key}_stderr"] = mean_and_stderr(vals)
            out[f"{key}_per_seed"] = vals
    return out


def _row(method: str, sched: Schedule, res: dict, cost: dict, seeds: list[int] | None = None) -> dict:
    return {"method": method, "schedule": sched.to_string() or "none", "keep": sched.final_keep,
            "keep_ratio": round(sched.final_keep / sched.num_patches, 3), "top1": res["top1"], "top5": res.get("top5"),
            "top1_stderr": res.get("top1_stderr"), "top1_per_seed": res.get("top1_per_seed"),
            "mean_cosine": res.get("mean_cosine_to_reference", 1.0 if sched.is_empty else None),
            "top1_agreement": res.get("top1_agreement_with_reference", 100.0 if sched.is_empty else None),
            "gflops": cost["gflops"], "tokens_per_block": cost["tokens_per_block"], "seeds": seeds}


def markdown_table(result: dict) -> str:
    head = ["method", "schedule", "keep", "top-1 %", "top-5 %", "cos to unpruned", "top-1 agreement %", "GFLOPs",
            "Δ top-1 (paired SE)"]
    lines = [f"Zero-shot on {result['dataset']}/{result['split']} ({result['images']} images), model "
             f"{result['model']['model']} ({result['model']['pretrained']}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        top1 = f"{r['top1']:.2f}" + (f" ± {r['top1_stderr']:.2f} ({len(r['seeds'])} seeds)"
                                     if r.get("top1_stderr") is not None else "")
        lines.append("| " + " | ".join([
            r["method"], r["schedule"], str(r["keep"]), top1, f"{r['top5']:.2f}" if r["top5"] is not None else "-",
            f"{r['mean_cosine']:.4f}" if r["mean_cosine"] is not None else "-",
            f"{r['top1_agreement']:.1f}" if r["top1_agreement"] is not None else "-", f"{r['gflops']:.3f}",
            f"{r['paired_diff']:+.2f} ± {r['paired_se']:.2f} vs {r['paired_vs']}" if r.get("paired_vs") else "-"])
                + " |")
    lines += ["", "Δ top-1: the row minus Patch Ranking at the same schedule (rows without it: minus the unpruned "
              "model), per image on the same images; ± is the standard error of that paired difference."]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_flops(result: dict, path: Path) -> None:
    """The paper's Figure-1 style: top-1 vs GFLOPs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append((r["gflops"], r["top1"]))
    base = by_method.pop("none", None)
    for m, pts in by_method.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    if base:
        ax.axhline(base[0][1], color="grey", ls="--", label=f"unpruned ({base[0][0]:.3f} GFLOPs)")
    ax.set_xlabel("image encoder GFLOPs / image")
    ax.set_ylabel("zero-shot top-1 %")
    ax.set_title(f"{result['model']['model']} on {result['dataset']}/{result['split']}")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write a matplotlib figure atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def paired_gaps(result: dict, a: str, b: str) -> list[dict]:
    """Top-1 of method ``a`` minus method ``b`` per schedule (e.g. golden vs random)."""
    by = {(r["method"], r["schedule"]): r for r in result["rows"]}
    out = []
    for (m, s), r in by.items():
        if m == a and (b, s) in by:
            out.append({"schedule": s, f"{a}_minus_{b}": float(np.round(r["top1"] - by[(b, s)]["top1"], 3))})
    return out
