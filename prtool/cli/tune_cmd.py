"""``prtool tune`` and ``prtool export-text``: learnable tokens (Phase III) and the text encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import (
    check_inputs,
    check_output,
    check_schedule_syntax,
    dataset_note,
    emit,
    failed_validation_shown,
    setup,
    table,
)


def tune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Tokens checkpoint (.safetensors; config .json "
                                      "beside it).")] = Path("runs/tokens.safetensors"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: Annotated[str, typer.Option("--split", help="Split to draw the few shots from.")] = "train",
    eval_split: Annotated[str, typer.Option("--eval-split",
                                            help="Split to evaluate on at the end ('' to skip).")] = "test",
    image_root: o.ImageRoot = None,
    shots: Annotated[int, typer.Option("--shots", help="Images per class (seeded).")] = 16,
    schedule: o.Schedule = None,
    keep_ratio: o.KeepRatio = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    scorer: o.Scorer = "predictor",
    predictor: o.PredictorPath = None,
    n_ctx: Annotated[int | None, typer.Option("--n-ctx", help="Learnable context vectors (0 = the untuned model). "
                     "Default: 16, or fewer when the model's text context has less room (testbed: 9).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="text, visual or both.")] = "both",
    init: Annotated[str, typer.Option("--init",
                                      help="Initial phrase when its token count equals --n-ctx.")] = "a photo of a",
    epochs: Annotated[int, typer.Option("--epochs")] = 30,
    batch_size: o.BatchSize = 32,
    lr: Annotated[float, typer.Option("--lr")] = 0.002,
    kg_weight: Annotated[float, typer.Option("--kg-weight",
                                             help="Pull toward the zero-shot class embeddings (KgCoOp's lambda; 0 = "
                                                  "plain CoOp).")] = 8.0,
    seed: o.Seed = 0,
    limit: o.Limit = None,
    allow_other_weights: o.AllowOtherWeights = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Learn text context + coupled visual tokens with CLIP and the predictor frozen, pruning on."""
    setup(quiet, verbose)
    check_output(out, suffixes=(".safetensors",))
    check_schedule_syntax(schedule)
    check_inputs(predictor)
    from prtool.data.datasets import few_shot, load_dataset
    from prtool.encoder.build import EncoderSpec, resolve_predictor, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.tuning.prompts import resolve_n_ctx
    from prtool.tuning.tune import TuneConfig, evaluate_tuned, save_tuned, tune_tokens

    loaded = load_clip(model, pretrained)
    sched = schedule_for(loaded, schedule, keep_ratio, stages, first_block)
    spec = EncoderSpec(sched, scorer, resolve_predictor(loaded, sched, scorer, predictor), seed=seed,
                       allow_other_weights=allow_other_weights)
    train = few_shot(load_dataset(data, split, image_root), shots, seed)
    n_ctx = resolve_n_ctx(n_ctx, loaded.model, loaded.tokenizer(), train.class_synonyms)
    cfg = TuneConfig(n_ctx, mode, shots, epochs, batch_size, lr, init=init, seed=seed, kg_weight=kg_weight)
    learner, metrics = tune_tokens(loaded, train, spec, cfg, quiet=quiet)
    if eval_split:
        metrics["eval"] = evaluate_tuned(loaded, learner, load_dataset(data, eval_split, image_root).limit(limit), spec)
    save_tuned(learner, out, loaded, spec, cfg, train.classnames, metrics, train.class_synonyms)
    result = {"out": str(out), "schedule": spec.schedule.to_string() or "none", "mode": mode, "n_ctx": n_ctx,
              "train_images": len(train), **{k: v for k, v in metrics.items() if k != "history"},
              "final_epoch": metrics["history"][-1] if metrics["history"] else None, **dataset_note(train)}
    emit(result, as_json, lambda r: table(f"tokens -> {r['out']}", ["schedule", "mode", "n_ctx", "eval top-1"],
                                          [(r["schedule"], r["mode"], r["n_ctx"], r.get("eval", {}).get("top1"))]))


def export_text(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Output .onnx (manifest .json beside it).")] = Path("runs/export/text.onnx"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    tokens: Annotated[Path | None, typer.Option("--tokens", help="Learned context from `prtool tune`.")] = None,
    opset: Annotated[int, typer.Option("--opset")] = 18,
    allow_other_weights: o.AllowOtherWeights = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Export the text encoder (with the learned context) so consumers embed new class names."""
    setup(quiet, verbose)
    check_output(out, suffixes=(".onnx",))
    check_inputs(tokens=tokens)
    from prtool.encoder.models import load_clip
    from prtool.export.text_export import export_text as run

    loaded = load_clip(model, pretrained)
    with failed_validation_shown(as_json):
        result = run(loaded, out, tokens, opset=opset, allow_other_weights=allow_other_weights)
    emit(result, as_json,
         lambda r: print(f"wrote {r['onnx']} (n_ctx {r['n_ctx']}, max abs diff vs PyTorch {r['max_abs']:.1e})"))
