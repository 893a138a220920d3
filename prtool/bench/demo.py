"""The demo: the whole product on the embedded testbed, end to end, in a few minutes on 2 cores.

Export the unpruned and the pruned testbed encoder (each validated against PyTorch), score both
exports' zero-shot top-1 on the shipped eval images in onnxruntime, time them side by side, and
write a report folder (JSON, markdown, pictures of kept patches). The default pruned export is
rank-and-merge (``patch-ranking-merge``, prtool.encoder.rank_merge: the predictor's ranking with dropped
tokens fused and proportional attention), the method on the accuracy-latency front at the demo's
budget (benchmarks/README.md). Next to it, at the same schedule: plain Patch Ranking (TopK +
Gather, dropped tokens discarded), the peers EViT and ToMe (their own exports), and Patch Ranking with the shipped
learnable tokens (``assets/tokens.safetensors``, made by ``prtool tune``) scored by its baked-in
classifier head.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.bench.visualize import save_rows, stage_panels
from prtool.data.datasets import load_dataset
from prtool.data.zeroshot import text_classifier
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.flops import encoder_cost
from prtool.encoder.methods import merged_variant
from prtool.encoder.models import load_clip
from prtool.export.io_names import PIXELS
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.runtime.session import ort_session
from prtool.testbed import spec as tbspec
from prtool.testbed.spec import DEMO_KEEP_RATIO, DEMO_STAGES, demo_scorer
from prtool.util.reports import write_report
from prtool.util.timing import interleaved_latency

log = logging.getLogger(__name__)



def demo_tokens(loaded, spec: EncoderSpec):
    """``(spec, export extras)`` for the shipped learnable tokens, or None when they are missing or were
    tuned for another checkpoint or schedule (the demo then shows the other rows only)."""
    from prtool.errors import PrtoolError
    from prtool.tuning.tune import export_extras

    if not tbspec.TOKENS_PATH.exists():
        return None
    try:
        extras = export_extras(loaded, spec, tbspec.TOKENS_PATH, classifier=True)
    except PrtoolError as exc:
        log.warning("skipping the tuned row: %s", exc)
        return None
    return spec, {"visual_prompts": extras["visual_prompts"], "class_embeds": extras["class_embeds"],
                  "extra_manifest": extras["manifest"]}


def demo_variants(loaded, schedule) -> tuple[dict, dict, str, Path | None]:
    """``(specs, export extras, scorer, predictor)`` of the demo's exports, by variant name."""
    scorer, predictor = demo_scorer()
    specs = {"unpruned": EncoderSpec(schedule_for(loaded, "none")),
             "pruned": EncoderSpec(schedule, merged_variant(scorer).spec_name, predictor),  # rank-and-merge
             "patch-ranking": EncoderSpec(schedule, scorer, predictor),
             "evit": EncoderSpec(schedule, "evit"),
             "tome": EncoderSpec(schedule, "tome")}
    extras = {name: {} for name in specs}
    tuned = demo_tokens(loaded, EncoderSpec(schedule, scorer, predictor))
    if tuned is not None:
        specs["pruned+tokens"], extras["pruned+tokens"] = tuned
    return specs, extras, scorer, predictor


def _score(loaded, dataset, specs: dict, exports: dict, extras: dict) -> dict:
    """One row per export: zero-shot top-1 in onnxruntime, cost, validation."""
    class_emb = text_classifier(loaded, dataset)
    rows = {}
    for name, s in specs.items():
        log.info("zero-shot top-1 of %s.onnx on %d eval images (onnxruntime)", name, len(dataset))
        acc = evaluate_zero_shot(loaded, dataset, s, onnx_path=exports[name].onnx_path, class_emb=class_emb)
        enc, _ = build_pruned_encoder(loaded, s, visual_prompts=extras[name].get("visual_prompts"))
        rows[name] = {"schedule": s.schedule.to_string() or "none", "accuracy": acc, "cost": encoder_cost(enc),
                      "validation_passed": exports[name].report.passed, "onnx": str(exports[name].onnx_path)}
    return rows


def _time(loaded, dataset, exports: dict, rows: dict, batch: int, iters: int) -> dict:
    """Latency of every export side by side; adds each row's measured and ideal speedup."""
    log.info("timing the exports side by side (batch %d, %d interleaved iterations)", batch, iters)
    pixels, _, _ = dataset.load(range(min(batch, len(dataset))), loaded.preprocess)
    feed = pixels.numpy().astype(np.float32)
    sessions = {name: ort_session(e.onnx_path) for name, e in exports.items()}
    lat = interleaved_latency({n: (lambda s=s: s.run(None, {PIXELS: feed})) for n, s in sessions.items()},
                              warmup=3, iters=iters)
    for name, row in rows.items():
        row["speedup_p50"] = lat["unpruned"]["p50_ms"] / lat[name]["p50_ms"]
        row["ideal_flop_speedup"] = rows["unpruned"]["cost"]["gmacs"] / row["cost"]["gmacs"]
    return lat



def run_demo(out: Path, limit: int | None = None, latency_batch: int = 32, latency_iters: int = 20) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_clip("testbed", "default")
    schedule = schedule_for(loaded, keep_ratio=DEMO_KEEP_RATIO, stages=DEMO_STAGES)
    specs, extras, scorer, predictor = demo_variants(loaded, schedule)
    log.info("exporting %s (schedule %s, scorer %s)", ", ".join(specs), schedule.to_string(), scorer)
    exports = {name: export_onnx(loaded, s, out / f"{name}.onnx", ExportOptions(), **extras[name])
               for name, s in specs.items()}
    dataset = load_dataset("testbed", "test").limit(limit)
    rows = _score(loaded, dataset, specs, exports, extras)
    lat = _time(loaded, dataset, exports, rows, latency_batch, latency_iters)
    speedup, ideal = rows["pruned"]["speedup_p50"], rows["pruned"]["ideal_flop_speedup"]
    pictures = save_kept_patches(loaded, specs["pruned"], dataset, out / "kept_patches.png")
    report = {
        "model": loaded.model_id,
        "schedule": schedule.to_dict(),
        "scorer": specs["pruned"].scorer,
        "predictor": str(predictor) if predictor else None,
        "eval_images": len(dataset),
        "variants": rows,
        "latency": {"backend": "onnxruntime CPU", "batch": latency_batch, "threads": torch.get_num_threads(),
                    "results": lat, "speedup_p50": speedup, "ideal_flop_speedup": ideal,
                    "measured_over_ideal": speedup / ideal},
        "pictures": str(pictures),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_report(out, "report", report, render_markdown(report))
    return report


def save_kept_patches(loaded, spec: EncoderSpec, dataset, path: Path, count: int = 8) -> Path:
    """One row per image (the first ``count``): the patches ``spec``'s encoder keeps at each stage."""
    enc, _ = build_pruned_encoder(loaded, spec)
    schedule = spec.schedule
    shown = range(min(count, len(dataset)))
    shown_pixels, _, _ = dataset.load(shown, loaded.preprocess)
    with torch.no_grad():
        order = torch.argsort(enc.first_stage_scores(shown_pixels), dim=1, descending=True, stable=True)
    canvases = dataset.arrays[[dataset.samples[i][0] for i in shown]]
    grid = loaded.visual.grid_size
    save_rows([stage_panels(c, order[i].numpy(), list(schedule.keep), grid,
                            titles=[f"block {b}: keep {k}" for b, k in zip(schedule.blocks, schedule.keep)])
               for i, c in enumerate(canvases)], path)
    return path


def summary_rows(report: dict) -> list[tuple]:
    lat = report["latency"]["results"]
    rows = []
    for name, v in report["variants"].items():
        a = v["accuracy"]
        rows.append((name, v["schedule"], v["cost"]["tokens_per_block"][-1], round(v["cost"]["gflops"], 3),
                     round(a["top1"], 2), round(a.get("top5", float("nan")), 2), a.get("mean_cosine_to_reference"),
                     round(lat[name]["p50_ms"], 2), round(v["speedup_p50"], 2), v["validation_passed"]))
    return rows


SUMMARY_COLUMNS = ["variant", "schedule", "tokens in last block", "GFLOPs", "top-1 %", "top-5 %",
                   "cos to unpruned", "p50 ms", "speedup", "export validated"]


def render_markdown(report: dict) -> str:
    lat = report["latency"]
    lines = [
        "# prtool demo report",
        "",
        f"Model: testbed ({report['model']['pretrained']}); schedule `{report['schedule']['string']}` "
        f"(keep {report['schedule']['final_keep']}/{report['schedule']['num_patches']} patches, scorer "
        f"{report['scorer']}); {report['eval_images']} shipped eval images; accuracy from the ONNX exports in "
        "onnxruntime.",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    for r in summary_rows(report):
        lines.append("| " + " | ".join(_cell(v) for v in r) + " |")
    lines += [
        "",
        "Rows: `pruned` is rank-and-merge (`patch-ranking-merge`: the predictor ranks once with one sorted TopK; "
        "the tokens past each stage's k are fused into one size-weighted token and later blocks use proportional "
        "attention); `patch-ranking` is plain Patch Ranking (TopK + Gather, the rest discarded); `evit` and `tome` "
        "are the peers at the same token counts; `pruned+tokens` is Patch Ranking with the shipped learnable "
        "tokens (text context + visual tokens), scored by the classifier head baked into its export.",
        "",
        f"Latency ({lat['backend']}, batch {lat['batch']}, {lat['threads']} threads, interleaved): "
        f"speedup {lat['speedup_p50']:.2f}x vs ideal FLOP ratio {lat['ideal_flop_speedup']:.2f}x "
        f"(measured/ideal {lat['measured_over_ideal']:.2f}). Absolute times on shared CPUs are noisy; quote the ratio.",
        "",
        "![kept patches](kept_patches.png)",
        "",
    ]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
