"""Shared option aliases, so every command spells and documents them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.encoder.methods import help_names

Model = Annotated[str, typer.Option("--model", "-m",
                                    help="open_clip architecture (ViT-B-16, ViT-B-32, ViT-L-14, ...) or 'testbed'.")]
Pretrained = Annotated[str | None, typer.Option(
    "--pretrained", "-p",
    help="open_clip pretrained tag, a local checkpoint (.safetensors or torch state_dict), or 'none' (random). "
         "Default: 'none', or the committed checkpoint for --model testbed.")]
Schedule = Annotated[str | None, typer.Option("--schedule", "-s",
                                              help="Stages as block:removed pairs, e.g. '3:20,5:20,7:20,9:20'; 'none' "
                                                   "= unpruned.")]
KeepRatio = Annotated[float | None, typer.Option("--keep-ratio",
                                                 help="Derive a schedule keeping this fraction of patches (with "
                                                      "--stages).")]
Stages = Annotated[int, typer.Option("--stages", help="Number of stages for --keep-ratio.")]
FirstBlock = Annotated[int | None, typer.Option("--first-block",
                                                help="First stage block for --keep-ratio (default: about a third of "
                                                     "the depth).")]
Scorer = Annotated[str, typer.Option("--scorer", help=f"The method (what the encoder does with the patches; "
                                     f"prtool.encoder.methods): {help_names('encoder')}.")]
PredictorPath = Annotated[Path | None, typer.Option("--predictor",
                                                    help="Trained predictor (.safetensors from `prtool train`).")]
Data = Annotated[str, typer.Option("--data", "-d",
                                   help="'testbed', 'testbed-sketch' (the same items as line drawings), a "
                                        "class-folder directory, a .csv manifest or a CoOp split .json.")]
Split = Annotated[str, typer.Option("--split", help="train, val or test.")]
ImageRoot = Annotated[Path | None, typer.Option("--image-root",
                                                help="Root folder for relative image paths in .csv/.json datasets.")]
Limit = Annotated[int | None, typer.Option("--limit", help="Use only the first N images (quick runs).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result; no logs, no progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
Shots = Annotated[int | None, typer.Option("--shots",
                                           help="Few-shot: at most this many images per class (seeded by --seed).")]
Device = Annotated[str, typer.Option("--device", help="Where PyTorch runs: auto (CUDA if visible), cpu, cuda, cuda:N.")]
AllowOtherWeights = Annotated[bool, typer.Option(
    "--allow-other-weights",
    help="Use a predictor/tokens made for other weights of this architecture anyway (recorded in the manifest).")]
