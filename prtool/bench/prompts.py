"""``prtool bench prompts``: the paper's Table 5 rows on one dataset, from one command.

Rows: ``none`` (untuned, unpruned), ``prune`` (untuned, pruned), ``T`` / ``T+prune`` (text context
tuned without / with pruning active, evaluated the same way), ``T+V`` / ``T+V+prune`` (text and
coupled visual tokens). Tuning always happens with the evaluated pruning switched on or off, as
in deployment.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.data.datasets import ImageDataset, few_shot
from prtool.encoder.build import EncoderSpec, build_pruned_encoder
from prtool.encoder.flops import encoder_cost
from prtool.encoder.schedule import Schedule
from prtool.tuning.tune import TuneConfig, evaluate_tuned, tune_tokens
from prtool.util.stats import paired_difference

log = logging.getLogger(__name__)


def bench_prompts(loaded, train: ImageDataset, test: ImageDataset, schedule: Schedule, scorer: str,
                  predictor, cfg: TuneConfig) -> dict:
    unpruned = EncoderSpec(Schedule((), schedule.num_patches, schedule.depth))
    pruned = EncoderSpec(schedule, scorer, predictor)
    shots = few_shot(train, cfg.shots, cfg.seed)
    rows, hits = [], {}
    for name, spec in (("none", unpruned), ("prune", pruned)):
        h: list = []
        res = evaluate_zero_shot(loaded, test, spec, compare_unpruned=False, hits_out=h)
        hits[name] = h[0]
        rows.append({"row": name, "top1": res["top1"], "top5": res.get("top5"), "spec": spec})
    for mode, tag in (("text", "T"), ("both", "T+V")):
        for spec, suffix in ((unpruned, ""), (pruned, "+prune")):
            log.info("tuning %s%s", tag, suffix)
            learner, metrics = tune_tokens(loaded, shots, spec, replace(cfg, mode=mode), quiet=True)
            h = []
            res = evaluate_tuned(loaded, learner, test, spec, hits_out=h)
            hits[tag + suffix] = h[0]
            rows.append({"row": tag + suffix, "top1": res["top1"], "top5": res.get("top5"), "spec": spec,
                         "final_train_loss": metrics["history"][-1]["loss"] if metrics["history"] else None})
    out_rows = []
    for r in rows:
        spec = r.pop("spec")
        # visual tokens sit in every block: an encoder holding them counts them at their real length
        n_vis = cfg.n_ctx if r["row"].startswith("T+V") else 0
        prompts = torch.zeros(n_vis, loaded.visual.class_embedding.shape[0]) if n_vis else None
        enc, _ = build_pruned_encoder(loaded, spec, visual_prompts=prompts)
        cost = encoder_cost(enc)
        out_rows.append({**r, "schedule": spec.schedule.to_string() or "none", "gflops": cost["gflops"]})
    paired = []
    for a, b in PAIRS:
        diff, se = paired_difference(hits[a], hits[b])
        paired.append({"a": a, "b": b, "diff": diff, "se": se})
    return {"model": loaded.model_id, "dataset": test.name, "split": test.split, "images": len(test),
            "shots": cfg.shots, "train_images": len(shots), "tune_config": {"seed": cfg.seed},
            "rows": out_rows, "paired": paired}


# The comparisons the paper's Table 5 is about: what pruning costs once tuned, what tuning recovers.
PAIRS = (("T+V+prune", "T+V"), ("T+V+prune", "prune"), ("T+prune", "prune"), ("T+V", "none"), ("prune", "none"))


def markdown_table(result: dict) -> str:
    lines = [f"Table-5-style ablation on {result['dataset']}/{result['split']} ({result['images']} images), "
             f"{result['shots']} shots per class ({result['train_images']} images), seed "
             f"{result['tune_config'].get('seed')}; "
             + ", ".join(f"{k} {v}" for k, v in result["tune_config"].items() if k not in ("seed", "shots")) + ".",
             "", "| row | schedule | top-1 % | top-5 % | GFLOPs |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['schedule']} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {r['gflops']:.3f} |" if r["top5"] is not None else
                     f"| {r['row']} | {r['schedule']} | {r['top1']:.2f} | - | {r['gflops']:.3f} |")
    if result.get("paired"):
        lines += ["", "Paired differences on the same images (top-1 points ± standard error):", ""]
        lines += [f"- {p['a']} − {p['b']}: {p['diff']:+.2f} ± {p['se']:.2f}" for p in result["paired"]]
    return "\n".join(lines) + "\n"
