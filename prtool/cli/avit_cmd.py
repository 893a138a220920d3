"""``prtool tune-avit``: fine-tune A-ViT's halting and calibrate its thresholds (``prtool.tuning.avit_train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_output, check_schedule_syntax, dataset_note, emit, setup, table

DEFAULT_SCHEDULES = "1:20,2:20,3:19,4:19;1:30,2:30,3:30,4:30"


def tune_avit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Weights (.safetensors; metadata .json beside it).")] = Path(
        "runs/avit.safetensors"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: Annotated[str, typer.Option("--split", help="Split to fine-tune and calibrate on.")] = "train",
    image_root: o.ImageRoot = None,
    schedules: Annotated[str, typer.Option("--schedules", "-s", help="';'-separated schedules whose mean token "
                                           "count per block each threshold must match.")] = DEFAULT_SCHEDULES,
    epochs: Annotated[int, typer.Option("--epochs")] = 1,
    images: Annotated[int, typer.Option("--images", help="Training images (the first N of the split).")] = 1500,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Images the thresholds are calibrated on.")] = 192,
    prior_mean: Annotated[float | None, typer.Option("--prior-mean", help="Block where the Gaussian prior peaks "
                                                     "(default: matched to the schedules' mean depth).")] = None,
    lr: Annotated[float, typer.Option("--lr")] = 2e-3,
    seed: o.Seed = 0,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Fine-tune A-ViT halting (text tower frozen) and calibrate one threshold per schedule."""
    setup(quiet, verbose)
    check_output(out, suffixes=(".safetensors",))
    parts = [s.strip() for s in schedules.split(";") if s.strip()]
    for s in parts:
        check_schedule_syntax(s)
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import schedule_for
    from prtool.encoder.models import load_clip
    from prtool.errors import PrtoolError
    from prtool.tuning.avit_train import AViTConfig, save_avit
    from prtool.tuning.avit_train import tune_avit as run

    for name, value in (("--epochs", epochs), ("--images", images), ("--calib-images", calib_images)):
        if value < 1:
            raise PrtoolError(f"{name} {value}: give a positive number")
    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root)
    cfg = AViTConfig(epochs=epochs, lr=lr, images=images, calib_images=calib_images, seed=seed)
    state, meta = run(loaded, dataset, [schedule_for(loaded, s) for s in parts], cfg, prior_mean)
    meta.update(dataset_note(dataset))
    save_avit(state, meta, out)
    result = {"out": str(out), **{k: meta[k] for k in ("train_seconds", "calibrate_seconds", "threads",
                                                      "parameters", "prior_mean", "thresholds", "history")}}
    emit(result, as_json, _human)


def _human(r: dict) -> None:
    rows = [(s, f"{c['threshold']:.4f}", f"{c['mean_active']:.1f}", f"{c['target_mean_active']:.1f}",
             " ".join(f"{x:.0f}" for x in c["active_per_block"])) for s, c in r["thresholds"].items()]
    table(f"A-ViT -> {r['out']} ({r['parameters']} tuned numbers; trained in {r['train_seconds']} s, "
          f"calibrated in {r['calibrate_seconds']} s, {r['threads']} threads)",
          ["schedule", "threshold", "mean active", "target", "active per block"], rows)


def avit_tokens(
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: o.Split = "test",
    image_root: o.ImageRoot = None,
    schedules: Annotated[str, typer.Option("--schedules", "-s", help="';'-separated calibrated schedules.")] = (
        DEFAULT_SCHEDULES),
    weights: Annotated[Path | None, typer.Option("--weights", help="A `prtool tune-avit` file (default: the "
                                                 "testbed's shipped one).")] = None,
    limit: o.Limit = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Patch tokens A-ViT keeps active entering each block on a dataset, against each schedule's counts."""
    setup(quiet, verbose)
    parts = [s.strip() for s in schedules.split(";") if s.strip()]
    for s in parts:
        check_schedule_syntax(s)
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.tuning.avit_train import mean_active

    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root).limit(limit)
    pixels = dataset.load(range(len(dataset)), loaded.preprocess)[0]
    rows = []
    for text in parts:
        sched = schedule_for(loaded, text)
        enc, _ = build_pruned_encoder(loaded, EncoderSpec(sched, "avit", weights))
        counts = mean_active(enc, pixels, enc.threshold)
        rows.append({"schedule": sched.to_string(), "threshold": enc.threshold,
                     "active_per_block": [round(float(c), 2) for c in counts], "mean_active": float(counts.mean()),
                     "schedule_per_block": list(sched.tokens_per_block(0)),
                     "schedule_mean": sum(sched.tokens_per_block(0)) / sched.depth})
    result = {"model": loaded.model_id, "dataset": dataset.name, "split": dataset.split, "images": len(dataset),
              "rows": rows, **dataset_note(dataset)}
    emit(result, as_json, lambda r: table(
        f"A-ViT active patch tokens per block on {r['dataset']}/{r['split']} ({r['images']} images)",
        ["schedule", "threshold", "A-ViT per block", "mean", "schedule per block", "mean"],
        [(x["schedule"], f"{x['threshold']:.4f}", " ".join(f"{c:.1f}" for c in x["active_per_block"]),
          f"{x['mean_active']:.2f}", " ".join(map(str, x["schedule_per_block"])), f"{x['schedule_mean']:.2f}")
         for x in r["rows"]]))
