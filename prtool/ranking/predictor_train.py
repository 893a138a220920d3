"""Phase II: train the Mix-MLP ranking predictor on golden rankings (ListNet loss).

Inputs are the model's own patch tokens entering the rank block (CLIP frozen); targets are the
stored per-token importances. Loss: ``KL(softmax(z(importance) / tau) || softmax(scores))``,
averaged over the batch. AdamW + cosine schedule, seeded train/val split, match@K per epoch. A few
thousand rankings are few for the Mix-MLP (it overfits them within tens of epochs), so the weights
kept are those of the epoch with the best validation match@k_final (ties: lower validation loss).
Under ``torchrun`` the predictor is wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prtool.encoder.predictor import PredictorConfig, RankingPredictor, save_predictor
from prtool.ranking.store import RankingStore, init_distributed
from prtool.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictorTrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    tau: float = 0.5
    val_fraction: float = 0.1
    seed: int = 0


def listnet_loss(scores: torch.Tensor, importance: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B, N]`` predicted scores vs golden importance: mean KL(target || prediction)."""
    z = (importance - importance.mean(1, keepdim=True)) / importance.std(1, keepdim=True).clamp_min(1e-6)
    target = torch.softmax(z / tau, dim=1)
    return F.kl_div(torch.log_softmax(scores, dim=1), target, reduction="batchmean")


def match_at_k(scores: torch.Tensor, golden_rankings: torch.Tensor, k: int) -> float:
    """Mean ``|top-k predicted ∩ top-k golden| / k``."""
    pred = torch.topk(scores, k, dim=1).indices
    hits = [len(set(p.tolist()) & set(g[:k].tolist())) / k for p, g in zip(pred, golden_rankings)]
    return float(np.mean(hits))


@torch.no_grad()
def rank_block_tokens(encoder, dataset, rows: list[int], preprocess: dict, block: int,
                      batch_size: int = 64) -> torch.Tensor:
    """Patch tokens entering ``block`` for dataset rows: ``[M, N, D]`` (CLS and prompt tokens dropped), on
    the encoder's device."""
    out = []
    device = next(encoder.parameters()).device
    for i in range(0, len(rows), batch_size):
        pixels, _, _ = dataset.load(rows[i : i + batch_size], preprocess)
        out.append(encoder.tokens_before(pixels.to(device), block)[:, encoder.num_prefix :].float())
    return torch.cat(out)


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_predictor(tokens: torch.Tensor, store: RankingStore, cfg: PredictorTrainConfig, k_final: int,
                    quiet: bool = False, device: torch.device | str = "cpu") -> tuple[RankingPredictor, dict]:
    """Train on ``tokens`` ``[M, N, D]`` aligned with the store's rows, on ``device``; returns the predictor
    (on the CPU) and metrics."""
    dist = init_distributed()
    device = torch.device(device)
    m, n, d = tokens.shape
    tokens = tokens.to(device)
    torch.manual_seed(cfg.seed)
    predictor = RankingPredictor(PredictorConfig(n, d)).to(device)
    model = predictor
    if dist.initialized:
        ids = [device] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(predictor, device_ids=ids)
    imp = torch.from_numpy(store.importance).float().to(device)
    gold = torch.from_numpy(store.rankings)
    train_rows, val_rows = split_rows(m, cfg.val_fraction, cfg.seed)
    opt = torch.optim.AdamW(predictor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = train_rows[dist.rank :: dist.world]
    steps_per_epoch = max(1, math.ceil(len(per_rank) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    ks = sorted({min(100, n), k_final})
    best: tuple | None = None  # (match@k_final, -val_loss), epoch, state
    with progress_bar(cfg.epochs, "train predictor", quiet=quiet) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            perm = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()][dist.rank :: dist.world]
            losses = []
            for s in range(steps_per_epoch):
                rows = torch.from_numpy(perm[s * cfg.batch_size : (s + 1) * cfg.batch_size])
                if len(rows) == 0:
                    continue
                loss = listnet_loss(model(tokens[rows]), imp[rows], cfg.tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            metrics = evaluate_predictor(predictor, tokens, imp, gold, val_rows, ks, cfg.tau)
            metrics["train_loss"] = float(np.mean(losses)) if losses else float("nan")
            history.append({"epoch": epoch + 1, **metrics})
            key = (metrics[f"match@{k_final}"], -metrics["val_loss"])
            if len(val_rows) and (best is None or key > best[0]):
                best = (key, epoch + 1, {k: v.detach().clone() for k, v in predictor.state_dict().items()})
            bar.update(1, info=f"loss {metrics['train_loss']:.4f} val " +
                       " ".join(f"match@{k} {metrics[f'match@{k}']:.3f}" for k in ks))
    final = history[-1] if history else {}
    if best is not None:
        predictor.load_state_dict(best[2])
        final = history[best[1] - 1]
    return predictor.cpu().eval(), {"train_config": asdict(cfg), "train_images": int(len(train_rows)),
                              "val_images": int(len(val_rows)), "best_epoch": final.get("epoch"),
                              "val_metrics": final, "history": history}


@torch.no_grad()
def evaluate_predictor(predictor, tokens, imp, gold, rows, ks, tau) -> dict:
    if len(rows) == 0:
        return {f"match@{k}": float("nan") for k in ks} | {"val_loss": float("nan")}
    predictor.eval()
    r = torch.from_numpy(np.asarray(rows))
    scores = predictor(tokens[r])
    out = {f"match@{k}": match_at_k(scores.cpu(), gold[r], k) for k in ks}
    out["val_loss"] = float(listnet_loss(scores, imp[r], tau))
    scores, imp = scores.cpu(), imp.cpu()
    from prtool.util.stats import spearman

    out["spearman"] = float(np.mean([spearman(s.numpy(), i.numpy()) for s, i in zip(scores, imp[r])]))
    return out


def save_trained(predictor: RankingPredictor, out: Path, store: RankingStore, metrics: dict) -> None:
    idx = store.index
    meta = {"model_id": idx["model_id"], "rank_block": idx["rank_block"], "rankings": {
        k: idx[k] for k in ("score", "block_size", "stride", "iters", "dataset_fingerprint", "num_images")},
        "macs_per_image": predictor.macs(), "parameters": sum(p.numel() for p in predictor.parameters()), **metrics}
    save_predictor(predictor, out, meta)
