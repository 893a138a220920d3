"""Phase I: the golden ranking of patch tokens for one image.

Run the blocks before the rank block once on the full sequence; then build one variant per
r x r window of patches (stride s) with that window removed, run the remaining blocks on all
variants in batches, and score each variant (``preservation``: cosine to the full image's
embedding; ``label``: probability of the true class; ``confidence``: max class probability).
A token's dispensability is the mean score of the variants that removed it; the golden ranking
sorts tokens from most important (least dispensable) to least, ties broken by token index.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prtool.errors import PrtoolError

SCORE_MODES = ("preservation", "label", "confidence")


@dataclass(frozen=True)
class RankConfig:
    rank_block: int
    score: str = "preservation"
    block_size: int = 2
    stride: int = 1
    iters: int = 1
    drop_per_iter: int = 0  # greedy refinement: tokens dropped per iteration (default N // (2 * iters))
    batch_size: int = 64  # variants per forward pass

    def to_dict(self) -> dict:
        return asdict(self)


def windows(grid: tuple[int, int], size: int, stride: int) -> list[np.ndarray]:
    """Row-major patch indices of every ``size x size`` window at ``stride`` over the grid."""
    gh, gw = grid
    if not 1 <= size <= min(gh, gw):
        raise PrtoolError(f"--block-size {size} must be between 1 and the patch grid {gh}x{gw}")
    if stride < 1:
        raise PrtoolError(f"--stride {stride} must be >= 1")
    out = []
    for i in range(0, gh - size + 1, stride):
        for j in range(0, gw - size + 1, stride):
            out.append(np.array([(i + a) * gw + (j + b) for a in range(size) for b in range(size)], dtype=np.int64))
    return out


class GoldenRanker:
    """Computes golden rankings with a frozen ``PrunedVisionTransformer`` (empty schedule)."""

    def __init__(self, encoder, cfg: RankConfig, class_emb: torch.Tensor | None = None,
                 logit_scale: float = 100.0, batched: bool = True):
        if cfg.score not in SCORE_MODES:
            raise PrtoolError(f"unknown --score {cfg.score!r}: use {', '.join(SCORE_MODES)}")
        if cfg.score != "preservation" and class_emb is None:
            raise PrtoolError(f"--score {cfg.score} needs class names (zero-shot text embeddings); "
                              "use --score preservation for unlabelled images")
        depth = len(encoder.transformer.resblocks)
        if not 0 <= cfg.rank_block < depth:
            raise PrtoolError(f"--rank-block {cfg.rank_block} is outside 0..{depth - 1}")
        if cfg.iters < 1:
            raise PrtoolError(f"--iters {cfg.iters} must be >= 1")
        self.encoder, self.cfg = encoder, cfg
        self.grid = _grid(encoder)
        self.n = encoder.num_patches
        self.windows = windows(self.grid, cfg.block_size, cfg.stride)
        self.device = next(encoder.parameters()).device
        self.class_emb = None if class_emb is None else class_emb.to(self.device)
        self.logit_scale = logit_scale
        self.variant_batch = cfg.batch_size if batched else 1
        drop = cfg.drop_per_iter or self.n // (2 * cfg.iters)
        if cfg.iters > 1 and not 1 <= drop * (cfg.iters - 1) < self.n:
            raise PrtoolError(f"greedy refinement drops {drop} x {cfg.iters - 1} of {self.n} tokens: lower "
                              "--drop-per-iter")
        self.drop = drop

    def macs_per_image(self) -> float:
        """Multiply-accumulates to rank one image: every variant through the blocks from the rank block on."""
        from prtool.encoder.flops import block_macs

        enc = self.encoder
        tail = len(enc.transformer.resblocks) - self.cfg.rank_block
        tokens = self.n + enc.num_prefix - self.cfg.block_size ** 2
        return float(self.cfg.iters * len(self.windows) * tail * block_macs(tokens, enc.width))

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks from the rank block on, then ln_post(CLS) @ proj: ``[V, T, D] -> [V, E]``, unit norm."""
        enc = self.encoder
        for blk in enc.transformer.resblocks[self.cfg.rank_block :]:
            x = blk(x)
        return F.normalize(enc.pool(x, normalize=False).float(), dim=-1)

    def _score(self, emb: torch.Tensor, full: torch.Tensor, label: int | None) -> torch.Tensor:
        if self.cfg.score == "preservation":
            return emb @ full
        probs = torch.softmax(self.logit_scale * emb @ self.class_emb.t(), dim=-1)
        if self.cfg.score == "label":
            if label is None or label < 0:
                raise PrtoolError("--score label needs labelled images: this dataset has no labels")
            return probs[:, label]
        return probs.max(dim=-1).values

    def _dispensability(self, x: torch.Tensor, full: torch.Tensor, alive: np.ndarray, label: int | None) -> np.ndarray:
        """Mean variant score per patch among ``alive`` patches (NaN for patches no window removed)."""
        p = self.encoder.num_prefix
        variants = [w[np.isin(w, alive)] for w in self.windows]
        variants = [v for v in variants if len(v)]
        by_len: dict[int, list[np.ndarray]] = {}
        for v in variants:
            by_len.setdefault(len(v), []).append(v)
        total = np.zeros(self.n)
        count = np.zeros(self.n)
        alive_mask = np.zeros(self.n, dtype=bool)
        alive_mask[alive] = True
        for group in by_len.values():
            for start in range(0, len(group), self.variant_batch):
                chunk = group[start : start + self.variant_batch]
                keep = []
                for v in chunk:
                    m = alive_mask.copy()
                    m[v] = False
                    keep.append(np.flatnonzero(m))
                idx = torch.from_numpy(np.stack(keep)).to(x.device) + p
                seq = torch.cat([x[:, :p].expand(len(chunk), -1, -1),
                                 torch.gather(x.expand(len(chunk), -1, -1), 1,
                                              idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))], dim=1)
                scores = self._score(self._tail(seq), full, label).double().cpu().numpy()
                for v, s in zip(chunk, scores):
                    total[v] += s
                    count[v] += 1
        with np.errstate(invalid="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    @torch.no_grad()
    def rank(self, pixels: torch.Tensor, label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One image ``[1, 3, H, W]`` -> ``(ranking [N] int16, importance [N] float32)``.

        ``importance`` is minus the dispensability (higher = more important); patches no window
        removed get the maximum importance (they were never shown to be dispensable).
        """
        x = self.encoder.tokens_before(pixels.to(self.device), self.cfg.rank_block)
        full = self._tail(x)[0]
        alive = np.arange(self.n)
        dropped: list[np.ndarray] = []
        for it in range(self.cfg.iters):
            disp = self._dispensability(x, full, alive, label)
            if it == self.cfg.iters - 1:
                break
            cand = disp[alive]
            order = np.argsort(-np.nan_to_num(cand, nan=-np.inf), kind="stable")  # most dispensable first
            drop = alive[order[: self.drop]]
            dropped.append(drop)
            alive = np.setdiff1d(alive, drop)
        importance = -disp
        finite = importance[np.isfinite(importance)]
        top = finite.max() if finite.size else 0.0
        importance = np.where(np.isnan(importance), top, importance)
        survivors = alive[np.argsort(-importance[alive], kind="stable")]
        ranking = list(survivors)
        rank_pos = len(ranking)
        for group in reversed(dropped):  # dropped later = more important than dropped earlier
            ranking.extend(group.tolist())
        # dropped tokens' importance: below every survivor, ordered as ranked
        final_imp = importance.copy()
        if dropped:
            floor = importance[alive].min()
            for j, t in enumerate(ranking[rank_pos:]):
                final_imp[t] = floor - 1.0 - j
        return np.asarray(ranking, dtype=np.int16), final_imp.astype(np.float32)


def _grid(encoder) -> tuple[int, int]:
    h, w = encoder.image_size
    ph, pw = encoder.conv1.kernel_size
    return h // ph, w // pw
