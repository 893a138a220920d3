"""``prtool testbed data|train``: make the testbed's images and train its CLIP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_output, emit, setup

app = typer.Typer(help="The testbed: Cluttered Fashion-MNIST and the small CLIP prtool trains on it.",
                  no_args_is_help=True)

IdxDir = Annotated[Path, typer.Option("--idx-dir",
                                      help="Folder of the Fashion-MNIST IDX files (Debian: dataset-fashion-mnist).")]
DEFAULT_IDX = Path("/usr/share/datasets/fashion-mnist")


@app.command("data")
def data(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Output folder for the canvases.")] = Path("runs/testbed-data"),
    idx_dir: IdxDir = DEFAULT_IDX,
    split: Annotated[str, typer.Option("--split", help="train (60k items) or test (10k items).")] = "test",
    limit: o.Limit = None,
    seed: o.Seed = 1,
    png: Annotated[bool, typer.Option("--png",
                                      help="Also write an ImageFolder tree of PNGs (one folder per class).")] = False,
    build_packs: Annotated[bool, typer.Option("--build-packs",
                                              help="Rebuild the shipped packs in prtool/testbed/assets.")] = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Render Cluttered Fashion-MNIST canvases (same seed -> same bytes) to OUT/SPLIT.npz."""
    setup(quiet, verbose)
    if not build_packs:
        check_output(out, "dir")
    import numpy as np
    from PIL import Image

    from prtool.errors import PrtoolError
    from prtool.testbed import data as tbdata
    from prtool.testbed import spec
    from prtool.testbed.eval_set import build_pack

    if build_packs:
        result = {"packs": [build_pack(s, idx_dir) for s in ("test", "train", "val")]}
        emit(result, as_json,
             lambda r: [print(f"wrote {p['path']} ({p['count']} items, canvases sha256 {p['canvases_sha256'][:16]})")
                        for p in r["packs"]])
        return
    if split not in ("train", "test"):
        raise PrtoolError(f"unknown split {split!r}: use train or test")
    items, labels = tbdata.load_fashion_mnist(split, idx_dir)
    n = len(items) if limit is None else min(limit, len(items))
    out.mkdir(parents=True, exist_ok=True)
    canvases = tbdata.render_canvases(items, seed=seed, indices=range(n))
    target = out / f"{split}.npz"
    tmp = out / f".{split}.tmp.npz"
    np.savez_compressed(tmp, canvases=canvases, labels=labels[:n], seed=np.int64(seed))
    tmp.replace(target)
    if png:
        for i, (c, lab) in enumerate(zip(canvases, labels[:n])):
            folder = out / split / spec.CLASSNAMES[int(lab)].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(c).save(folder / f"{i:05d}.png")
    result = {"npz": str(target), "images": n, "seed": seed, "sha256": tbdata.canvases_sha256(canvases),
              "png_folder": str(out / split) if png else None}
    emit(result, as_json, lambda r: print(f"wrote {r['npz']} ({r['images']} canvases, sha256 {r['sha256'][:16]})"))


@app.command("train")
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint (.safetensors, "
                                      "fp16).")] = Path("runs/testbed/testbed.safetensors"),
    idx_dir: IdxDir = DEFAULT_IDX,
    samples: Annotated[int, typer.Option("--samples", help="Training images seen in total.")] = 224_000,
    batch_size: o.BatchSize = 64,  # keep in step with TrainConfig
    seed: o.Seed = 0,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start over even if a training state exists.")] = False,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate",
                                           help="Zero-shot top-1 on the shipped eval split at the end.")] = True,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Train the testbed CLIP from scratch (about an hour on 2 CPU cores); resumes if interrupted."""
    setup(quiet, verbose)
    check_output(out, suffixes=(".safetensors",))
    from prtool.testbed import spec
    from prtool.testbed.reference import write_reference
    from prtool.testbed.train import TrainConfig, train_testbed

    cfg = TrainConfig(samples=samples, batch_size=batch_size, seed=seed)
    result = train_testbed(out, cfg, idx_dir, resume=not no_resume, quiet=quiet)
    if out.resolve() == spec.CHECKPOINT_PATH.resolve():
        write_reference(out)  # the committed checkpoint's regression anchor
    if evaluate:
        from prtool.bench.evaluate import evaluate_zero_shot
        from prtool.data.datasets import load_dataset
        from prtool.encoder.models import load_clip

        result["eval"] = evaluate_zero_shot(load_clip("testbed", str(out)), load_dataset("testbed", "test"))
    emit(result, as_json, lambda r: print(f"wrote {out}" + (f"; zero-shot top-1 {r['eval']['top1']:.2f}%"
                                                            if "eval" in r else "")))
