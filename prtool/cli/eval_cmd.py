"""``prtool eval``: zero-shot accuracy, unpruned or pruned, in PyTorch or from an ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_inputs, check_schedule_syntax, dataset_note, emit, setup, table


def eval_(
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: o.Split = "test",
    image_root: o.ImageRoot = None,
    templates: Annotated[Path | None, typer.Option("--templates",
                                                   help="JSON prompt templates (a list, or {dataset: list}).")] = None,
    schedule: o.Schedule = None,
    keep_ratio: o.KeepRatio = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    scorer: o.Scorer = "predictor",
    predictor: o.PredictorPath = None,
    rankings: Annotated[Path | None, typer.Option("--rankings",
                                                  help="Rankings store for --scorer golden (the oracle).")] = None,
    seed: o.Seed = 0,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="Score this exported ONNX file (onnxruntime CPU) "
                                              "instead of PyTorch.")] = None,
    limit: o.Limit = None,
    shots: o.Shots = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad",
                                           help="Skip unreadable images (recorded in the result).")] = False,
    batch_size: o.BatchSize = 64,
    allow_other_weights: o.AllowOtherWeights = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Zero-shot top-1/top-5 of a model on a dataset."""
    setup(quiet, verbose)
    check_schedule_syntax(schedule)
    check_inputs(predictor, onnx=onnx)
    from prtool.bench.evaluate import evaluate_zero_shot
    from prtool.data.datasets import few_shot, load_dataset
    from prtool.encoder.build import EncoderSpec, resolve_predictor, schedule_for
    from prtool.encoder.models import load_clip

    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root, templates)
    dataset = (few_shot(dataset, shots, seed) if shots else dataset).limit(limit)
    sched = schedule_for(loaded, schedule, keep_ratio, stages, first_block)
    spec = EncoderSpec(sched, scorer, resolve_predictor(loaded, sched, scorer, predictor), seed=seed,
                       allow_other_weights=allow_other_weights)
    result = evaluate_zero_shot(loaded, dataset, spec, onnx_path=onnx, batch_size=batch_size, skip_bad=skip_bad,
                                rankings=rankings)
    result["model"] = loaded.model_id
    result.update(dataset_note(dataset))
    emit(result, as_json, lambda r: table(
        f"zero-shot on {r['dataset']}/{r['split']} ({r['images']} images, {r['backend']})",
        ["schedule", "scorer", "top1", "top5", "cos to unpruned", "top1 agreement"],
        [(r["schedule"], r["scorer"], r["top1"], r.get("top5"), r.get("mean_cosine_to_reference"),
          r.get("top1_agreement_with_reference"))]))
