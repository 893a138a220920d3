"""``prtool tune-avit``: fine-tune A-ViT's halting on a dataset (CLIP's text tower frozen) and calibrate
one halting threshold per schedule; the weights file the ``avit`` and ``avit-topk`` methods load.

Trained: ``gamma``/``beta``, the image tower's LayerNorms (not ``ln_post``) and row 0 of every block's
output projections (what writes the halting channel ``x[..., 0]``): a few thousand numbers, so the
file stays small. The task loss is label-free: cross-entropy to the unpruned model's own zero-shot class
distribution (a teacher), so A-ViT learns from no more than Patch Ranking's preservation rankings do;
plus A-ViT's ponder loss and distributional prior (``prtool.encoder.avit``). Halted keys are masked in the
forward pass; a straight-through bias (zero in value) lets the task loss reach the halting scores.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prtool.encoder.avit import (
    AViTVisionTransformer,
    apply_tuned_state,
    gaussian_prior,
    halting_losses,
    prior_mean_for,
    tuned_parameters,
    tuned_state,
)
from prtool.encoder.models import LoadedModel
from prtool.errors import PrtoolError

log = logging.getLogger(__name__)

AVIT_METHODS = ("avit", "avit-topk")


@dataclass(frozen=True)
class AViTConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    ponder_weight: float = 5e-3
    distr_weight: float = 0.1
    prior_std: float = 1.0
    train_threshold: float = 0.99  # the paper's 1 - eps
    images: int = 1500
    calib_images: int = 192
    seed: int = 0


def _teacher(loaded: LoadedModel, pixels: torch.Tensor, class_emb: torch.Tensor, batch: int) -> torch.Tensor:
    """The unpruned model's zero-shot class probabilities ``[M, C]`` (the label-free target)."""
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for

    enc, _ = build_pruned_encoder(loaded, EncoderSpec(schedule_for(loaded, "none")), normalize=True)
    scale = loaded.model.logit_scale.exp().detach()
    with torch.no_grad():
        return torch.cat([F.softmax(scale * enc(pixels[i : i + batch]) @ class_emb.t(), -1)
                          for i in range(0, len(pixels), batch)])


def train_halting(loaded: LoadedModel, pixels: torch.Tensor, class_emb: torch.Tensor, prior_mean: float,
                  cfg: AViTConfig, on_epoch=None) -> tuple[dict, list[dict]]:
    """Fine-tune on ``pixels`` ``[M, 3, H, W]``; returns the tuned state (``prtool.encoder.avit.tuned_state``) and
    the per-epoch history (task, ponder, distribution losses, mean active patch tokens per block)."""
    from prtool.encoder.build import schedule_for

    torch.manual_seed(cfg.seed)
    target = _teacher(loaded, pixels, class_emb, cfg.batch_size)
    visual, halting = apply_tuned_state(loaded.visual, tuned_state(_init_halting(), loaded.visual))
    enc = AViTVisionTransformer(visual, schedule_for(loaded, "none"), halting, cfg.train_threshold, normalize=True)
    for prm in enc.parameters():
        prm.requires_grad_(False)
    params = list(tuned_parameters(visual).values()) + list(halting.parameters())
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    enc.train().straight_through = True
    prior = gaussian_prior(enc.schedule.depth, prior_mean, cfg.prior_std)
    scale = loaded.model.logit_scale.exp().detach()
    steps = math.ceil(len(pixels) / cfg.batch_size)
    gen, history = torch.Generator().manual_seed(cfg.seed), []
    for epoch in range(cfg.epochs):
        order, sums = torch.randperm(len(pixels), generator=gen), torch.zeros(4)
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch * steps + s) / (cfg.epochs * steps)))
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                emb, info = enc.forward_halting(pixels[idx])
            logits = scale * F.normalize(emb.float(), dim=-1) @ class_emb.t()
            task = -(target[idx] * F.log_softmax(logits, -1)).sum(-1).mean()
            ponder, distr = halting_losses(info, prior)
            loss = task + cfg.ponder_weight * ponder + cfg.distr_weight * distr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _keep_row0_only(visual)
            opt.step()
            sums += torch.tensor([task.item(), ponder.item(), distr.item(), info["active"].float().mean().item()])
        history.append(dict(zip(("task", "ponder", "distribution", "mean_active"), (sums / steps).tolist()),
                            epoch=epoch + 1))
        if on_epoch:
            on_epoch(history[-1])
    return tuned_state(halting, visual), history


def _init_halting():
    from prtool.encoder.avit import HaltingHead

    return HaltingHead()


def _keep_row0_only(visual) -> None:
    """Zero the gradients of the output projections outside row 0 (only the halting channel is tuned)."""
    from prtool.encoder.avit import is_row0

    for name, prm in tuned_parameters(visual).items():
        if is_row0(name) and prm.grad is not None:
            prm.grad[1:] = 0


@torch.no_grad()
def mean_active(enc: AViTVisionTransformer, pixels: torch.Tensor, threshold: float, batch: int = 128) -> torch.Tensor:
    """Mean active patch tokens entering each block, ``[L]``, over ``pixels`` at ``threshold``."""
    counts = [enc.forward_halting(pixels[i : i + batch], threshold)[1]["active"] for i in range(0, len(pixels), batch)]
    return torch.cat(counts).float().mean(0)


def calibrate_threshold(enc: AViTVisionTransformer, pixels: torch.Tensor, schedule, iters: int = 10) -> dict:
    """The halting threshold whose mean active patch tokens per block equals ``schedule``'s (bisection:
    a higher threshold halts later, so the count grows with it)."""
    target = sum(schedule.tokens_per_block(0)) / schedule.depth
    lo, hi = 0.0, 1.0
    while mean_active(enc, pixels, hi).mean() < target:
        lo, hi = hi, hi * 2
        if hi > 64:
            raise PrtoolError(f"A-ViT halts too early for {schedule.to_string()} at any threshold: tune it with a "
                              "later --prior-mean")
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_active(enc, pixels, mid).mean() < target else (lo, mid)
    counts = mean_active(enc, pixels, hi)
    return {"threshold": hi, "target_mean_active": target, "mean_active": float(counts.mean()),
            "active_per_block": [round(float(c), 2) for c in counts],
            "schedule_per_block": list(schedule.tokens_per_block(0))}


def tune_avit(loaded: LoadedModel, dataset, schedules: list, cfg: AViTConfig, prior_mean: float | None = None,
              on_epoch=None) -> tuple[dict, dict]:
    """Train once (prior at ``prior_mean``, default: the mean over ``schedules``), then calibrate each
    schedule's threshold on the first ``calib_images`` training images. Returns ``(state, meta)``."""
    from prtool.data.zeroshot import text_classifier

    if not schedules or any(s.is_empty for s in schedules):
        raise PrtoolError("tune-avit needs at least one pruning schedule to match (e.g. -s 1:20,2:20,3:19,4:19)")
    n = min(cfg.images, len(dataset))
    pixels = dataset.load(range(n), loaded.preprocess)[0]
    mean = prior_mean if prior_mean is not None else sum(prior_mean_for(s) for s in schedules) / len(schedules)
    t0 = time.perf_counter()
    state, history = train_halting(loaded, pixels, text_classifier(loaded, dataset), mean, cfg, on_epoch)
    train_s = time.perf_counter() - t0
    visual, halting = apply_tuned_state(loaded.visual, state)
    calib, thresholds = pixels[: cfg.calib_images], {}
    for sched in schedules:
        enc = AViTVisionTransformer(visual, sched, halting, normalize=True).eval()
        thresholds[sched.to_string()] = calibrate_threshold(enc, calib, sched)
    meta = {"model_id": loaded.model_id, "dataset": dataset.name, "split": dataset.split, "images": n,
            "prior_mean": mean, "train_config": asdict(cfg), "history": history, "train_seconds": round(train_s, 1),
            "calibrate_seconds": round(time.perf_counter() - t0 - train_s, 1), "threads": torch.get_num_threads(),
            "thresholds": thresholds, "parameters": int(sum(v.numel() for v in state.values()))}
    return state, meta


def save_avit(state: dict, meta: dict, path: Path) -> None:
    """Weights (.safetensors) + metadata (.json beside it), each written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise PrtoolError(f"--out {path}: A-ViT weights are written as NAME.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_j = path.with_name(path.name + ".tmp"), path.with_suffix(".json.tmp")
    save_file(state, str(tmp_w), metadata={"prtool": "avit"})
    tmp_j.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_w.replace(path)
    tmp_j.replace(path.with_suffix(".json"))
