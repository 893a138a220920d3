"""``prtool rank``, ``prtool train`` and ``prtool show``: golden rankings, the predictor, pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_inputs, check_output, check_schedule_syntax, dataset_note, emit, setup, table

Rankings = Annotated[Path, typer.Option("--rankings", "-r", help="A rankings store made by `prtool rank`.")]


def rank(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Store directory (resumes if it exists with the same options).")],
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "train",
    image_root: o.ImageRoot = None,
    score: Annotated[str, typer.Option("--score",
                                       help="preservation (no labels needed), label or confidence.")] = "preservation",
    block_size: Annotated[int, typer.Option("--block-size",
                                            help="Side r of the r x r window of patches removed per variant.")] = 2,
    stride: Annotated[int, typer.Option("--stride", help="Window stride (1: sliding, r: non-overlapping).")] = 1,
    rank_block: Annotated[int | None, typer.Option("--rank-block",
                                                   help="Block whose input is ranked (default: the default schedule's "
                                                        "first stage).")] = None,
    iters: Annotated[int, typer.Option("--iters", help="Greedy refinement iterations (1 = none).")] = 1,
    drop_per_iter: Annotated[int, typer.Option("--drop-per-iter", help="Tokens dropped per refinement iteration "
                                               "(0 = N / (2 iters)).")] = 0,
    batch_size: o.BatchSize = 64,
    shard_size: Annotated[int | None, typer.Option("--shard-size", min=1,
                                                   help="Images per shard, the unit of resumption (default: the "
                                                        "store's, else a few minutes of work on 2 CPU cores).")] = None,
    limit: o.Limit = None,
    shots: o.Shots = None,
    seed: o.Seed = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad",
                                           help="Leave out unreadable images (listed in index.json) instead of "
                                                "failing; resumes a store made without it.")] = False,
    one_variant_at_a_time: Annotated[bool, typer.Option("--unbatched",
                                                        help="Run variants one by one (benchmark reference).")] = False,
    device: o.Device = "auto",
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Golden rankings of a dataset's patches (Phase I). Resumable and self-repairing; distributed under torchrun."""
    setup(quiet, verbose)
    import sys

    check_output(out, "dir")
    from prtool.data.datasets import few_shot, load_dataset
    from prtool.encoder.models import load_clip
    from prtool.ranking.golden import RankConfig
    from prtool.ranking.jobs import default_rank_block, rank_dataset
    from prtool.ranking.store import rank_command

    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root)
    dataset = (few_shot(dataset, shots, seed) if shots else dataset).limit(limit)
    cfg = RankConfig(rank_block if rank_block is not None else default_rank_block(loaded), score, block_size, stride,
                     iters, drop_per_iter, batch_size)
    result = rank_dataset(loaded, dataset, out, cfg, shard_size, skip_bad, batched=not one_variant_at_a_time,
                          quiet=quiet,
                          command=rank_command(sys.argv[1:]), device=device)
    if result["rank"] != 0:
        return
    result.update(dataset_note(dataset))
    emit(result, as_json, lambda r: print(
        f"ranked {r['images']} images into {r['out']} ({r['shards']} shards of {r['shard_size']}, "
        f"{r['verified_shards']} verified, {r['computed_shards']} computed now"
        + (f", {r['skipped_images']} unreadable left out" if r["skipped_images"] else "")
        + f", {r['images_per_second']:.2f} img/s on {r['world']} process(es))"))


def train(
    rankings: Rankings,
    out: Annotated[Path, typer.Option("--out", "-o", help="Predictor checkpoint (.safetensors; config .json "
                                      "beside it).")] = Path("runs/predictor.safetensors"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: Annotated[str, typer.Option("--split", help="The split that was ranked.")] = "train",
    image_root: o.ImageRoot = None,
    epochs: Annotated[int, typer.Option("--epochs")] = 60,
    batch_size: o.BatchSize = 64,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    tau: Annotated[float, typer.Option("--tau", help="ListNet target temperature on z-scored importance.")] = 0.5,
    val_fraction: Annotated[float, typer.Option("--val-fraction")] = 0.1,
    k_final: Annotated[int | None, typer.Option("--k-final",
                                                help="K for match@K besides 100 (default: 60% of N).")] = None,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Train the Mix-MLP ranking predictor on golden rankings (Phase II). DDP under torchrun."""
    setup(quiet, verbose)
    check_output(out, suffixes=(".safetensors",))
    import json

    from prtool.data.datasets import load_dataset
    from prtool.encoder.models import load_clip
    from prtool.ranking.jobs import train_from_store
    from prtool.ranking.predictor_train import PredictorTrainConfig

    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root)
    cfg = PredictorTrainConfig(epochs, batch_size, lr, weight_decay, tau, val_fraction, seed)
    result = train_from_store(loaded, dataset, rankings, out, cfg, k_final, quiet=quiet, device=device)
    meta = json.loads(out.with_suffix(".json").read_text())
    result.update({k: meta[k] for k in ("parameters", "macs_per_image")}, **dataset_note(dataset))
    emit(result, as_json, lambda r: table(f"predictor -> {r['out']} ({r['parameters']:,} parameters, "
                                          f"{r['macs_per_image'] / 1e6:.2f} MMACs/image)", ["metric", "held-out value"],
                                          list(r["val_metrics"].items())))


def show(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG.")] = Path("runs/show.png"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: o.Split = "test",
    image_root: o.ImageRoot = None,
    rankings: Annotated[Path | None, typer.Option("--rankings", "-r",
                                                  help="Golden rankings store for these images.")] = None,
    predictor: o.PredictorPath = None,
    schedule: o.Schedule = None,
    keep_ratio: o.KeepRatio = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Number of images.")] = 6,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Pictures: pruned patches greyed out per stage; golden vs predicted rows side by side."""
    setup(quiet, verbose)
    check_output(out, suffixes=(".png",))
    check_schedule_syntax(schedule)
    check_inputs(predictor)
    from prtool.bench.show import render_show
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import schedule_for
    from prtool.encoder.models import load_clip

    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root)
    sched = schedule_for(loaded, schedule, keep_ratio, stages, first_block)
    result = render_show(loaded, dataset, sched, out, rankings, predictor, count)
    result.update(dataset_note(dataset))
    emit(result, as_json, lambda r: print(f"wrote {r['out']} ({r['images']} images, rows: {', '.join(r['rows'])})"))
