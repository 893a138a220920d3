"""The long jobs behind ``prtool rank`` and ``prtool train``, callable from Python and tests."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prtool.data.datasets import ImageDataset
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for, tower_geometry
from prtool.encoder.models import LoadedModel
from prtool.errors import PrtoolError
from prtool.ranking.golden import GoldenRanker, RankConfig
from prtool.ranking.predictor_train import PredictorTrainConfig, rank_block_tokens, save_trained, train_predictor
from prtool.ranking.store import compute_store, load_store
from prtool.util.device import resolve_device


def default_rank_block(loaded: LoadedModel) -> int:
    """The first stage block of the default schedule (about a third of the depth)."""
    from prtool.encoder.schedule import default_first_block

    return default_first_block(tower_geometry(loaded)[1])


def rank_dataset(loaded: LoadedModel, dataset: ImageDataset, out: Path, cfg: RankConfig, shard_size: int | None = None,
                 skip_bad: bool = False, batched: bool = True, quiet: bool = False, command: str | None = None,
                 device: str = "cpu") -> dict:
    """Golden rankings of every image of ``dataset`` into the store ``out`` (verified, resumable, torchrun-aware),
    computed on ``device`` (the device is a throughput knob, not part of the store's identity).

    ``shard_size`` None: the existing store's, else a few minutes of work on 2 CPU cores.
    """
    n, depth, width = tower_geometry(loaded)
    encoder, _ = build_pruned_encoder(loaded, EncoderSpec(schedule_for(loaded, "none")), normalize=False)
    class_emb = None
    if cfg.score != "preservation":
        if not dataset.classnames or (cfg.score == "label" and (dataset.labels < 0).any()):
            raise PrtoolError(f"--score {cfg.score} needs labelled images with class names: this dataset has none; "
                              "use --score preservation")
        from prtool.data.zeroshot import text_classifier

        class_emb = text_classifier(loaded, dataset)
    scale = float(loaded.model.logit_scale.detach().exp()) if hasattr(loaded.model, "logit_scale") else 100.0
    ranker = GoldenRanker(encoder.to(resolve_device(device)), cfg, class_emb, logit_scale=scale, batched=batched)
    plan = {"kind": "prtool-rankings", "model_id": loaded.model_id, **cfg.to_dict(), "num_patches": n, "dim": width,
            "depth": depth, "grid": list(loaded.visual.grid_size), "num_variants": len(ranker.windows),
            "dataset": dataset.name, "split": dataset.split, "dataset_fingerprint": dataset.fingerprint()}
    plan.pop("batch_size")  # throughput knob, not part of the result's identity
    return compute_store(ranker, dataset, loaded.preprocess, Path(out), plan, shard_size, skip_bad, quiet, command)


def train_from_store(loaded: LoadedModel, dataset: ImageDataset, rankings: Path, out: Path,
                     cfg: PredictorTrainConfig = PredictorTrainConfig(), k_final: int | None = None,
                     quiet: bool = False, device: str = "cpu") -> dict:
    """Train the predictor on a store's rankings, on ``device``; ``dataset`` must be the one that was ranked."""
    store = load_store(rankings)
    idx = store.index
    if idx["model_id"] != loaded.model_id:
        raise PrtoolError(f"rankings {rankings} were computed for {idx['model_id']}, not {loaded.model_id}: "
                          "rank with this model first")
    rows_of = {dataset.sample_id(i): i for i in range(len(dataset))}
    missing = [sid for sid in store.ids if sid not in rows_of]
    if missing:
        raise PrtoolError(f"rankings {rankings} hold images not in this dataset (first: {missing[0]}): "
                          "pass the --data/--split that was ranked")
    if not store.ids:
        raise PrtoolError(f"rankings {rankings} hold no images")
    encoder, _ = build_pruned_encoder(loaded, EncoderSpec(schedule_for(loaded, "none")), normalize=False)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    tokens = rank_block_tokens(encoder.to(dev), dataset, [rows_of[s] for s in store.ids], loaded.preprocess,
                               idx["rank_block"])
    n = idx["num_patches"]
    k_final = k_final or max(1, round(0.6 * n))
    predictor, metrics = train_predictor(tokens, store, cfg, k_final, quiet=quiet, device=dev)
    metrics["k_final"] = k_final
    seconds = time.perf_counter() - t0  # token extraction + training; not saved (a throughput figure, like the device)
    run = {"device": str(dev), "seconds": round(seconds, 2),
           "images_per_second": metrics["train_images"] * cfg.epochs / max(seconds, 1e-9)}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        save_trained(predictor, Path(out), store, metrics)
    return {"out": str(out), **{k: v for k, v in metrics.items() if k != "history"}, **run}
