"""Patch scorers (the rankers): who orders the patch tokens at the first pruning stage.

A scorer sees the full sequence entering the first stage block, ``x`` ``[B, T, D]`` with
``num_prefix`` protected tokens in front (CLS, learnable visual tokens), and the block itself;
it returns one score per patch token, ``[B, N]`` with ``N = T - num_prefix``. Higher scores are
kept. Scorers hold no per-forward state, so the exported graph is a pure function of the image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prtool.encoder.predictor import RankingPredictor, check_predictor_fits, load_predictor, untrained_predictor
from prtool.errors import PrtoolError


class PatchScorer(nn.Module):
    """Interface: ``forward(x, num_prefix, block) -> [B, N]`` scores. Export rules and needs are the
    ranker's entry in ``prtool.encoder.methods.RANKERS``."""

    name = "scorer"

    @classmethod
    def from_spec(cls, loaded, spec) -> tuple[PatchScorer, dict | None]:
        """The scorer an ``EncoderSpec`` asks for, and its checkpoint metadata (None without one)."""
        return cls(), None

    def forward(self, x: torch.Tensor, num_prefix: int, block: nn.Module) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def macs(self, encoder) -> int:
        """MACs per image spent scoring in ``encoder`` (``prtool.encoder.flops``)."""
        return 0

    def image_scores(self, loaded, dataset, store, rank_block: int):
        """Oracle rankers: ``(pixels, rows) -> [b, N]`` scores per evaluated image (``store``: a loaded rankings
        store, for the golden oracle); None for the others."""
        return None


class PredictorScorer(PatchScorer):
    """The Mix-MLP ranking predictor on the patch tokens (protected tokens never reach it)."""

    name = "predictor"

    def __init__(self, predictor: RankingPredictor):
        super().__init__()
        self.predictor = predictor

    @classmethod
    def from_spec(cls, loaded, spec):
        v = loaded.visual
        n, width = v.grid_size[0] * v.grid_size[1], v.class_embedding.shape[0]
        if spec.predictor_path is None:
            # An untrained predictor: a valid graph for export and speed work, not for accuracy.
            return cls(untrained_predictor(n, width)), None
        predictor, meta = load_predictor(spec.predictor_path)
        check_predictor_fits(meta, loaded.model_id, spec.schedule.first_block, n, width, spec.predictor_path,
                             spec.allow_other_weights)
        return cls(predictor), meta

    def forward(self, x, num_prefix, block):
        return self.predictor(x[:, num_prefix:])

    def macs(self, encoder) -> int:
        return self.predictor.macs()


def cls_attention(x: torch.Tensor, block: nn.Module, num_prefix: int) -> torch.Tensor:
    """Head-averaged attention of CLS to each patch token in ``block``'s attention, ``[B, N]``.

    Recomputed from the block's own ``ln_1`` and ``nn.MultiheadAttention`` in-projection, as the
    block would see ``x`` (softmax over the whole sequence, CLS and prompt tokens included).
    """
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise PrtoolError("cls-attn scoring needs open_clip's default attention blocks (nn.MultiheadAttention)")
    h = block.ln_1(x)
    dim, heads = attn.embed_dim, attn.num_heads
    w_q, w_k = attn.in_proj_weight[:dim], attn.in_proj_weight[dim : 2 * dim]
    bias = attn.in_proj_bias
    b_q, b_k = (bias[:dim], bias[dim : 2 * dim]) if bias is not None else (None, None)
    q = nn.functional.linear(h[:, :1], w_q, b_q)  # [B, 1, D]
    k = nn.functional.linear(h, w_k, b_k)  # [B, T, D]
    hd = dim // heads
    q = q.reshape(q.shape[0], 1, heads, hd).transpose(1, 2)  # [B, H, 1, hd]
    k = k.reshape(k.shape[0], k.shape[1], heads, hd).transpose(1, 2)  # [B, H, T, hd]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # [B, H, 1, T]
    return probs.mean(dim=1)[:, 0, num_prefix:]


class ClsAttentionScorer(PatchScorer):
    """Keep the patches CLS attends to most in the stage block (no fusion of the rest)."""

    name = "cls-attn"

    def forward(self, x, num_prefix, block):
        return cls_attention(x, block, num_prefix)

    def macs(self, encoder) -> int:
        n, width = encoder.schedule.num_patches + encoder.num_prefix, encoder.width
        return 2 * n * width * width + n * width  # ln_1 + q/k projections + scores


class RandomScorer(PatchScorer):
    """Uniform random scores from a seeded generator (a baseline; evaluation only)."""

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_spec(cls, loaded, spec):
        return cls(spec.seed), None

    def forward(self, x, num_prefix, block):
        n = x.shape[1] - num_prefix
        return torch.rand(x.shape[0], n, generator=self._gen).to(x.device)


class GoldenScorer(PatchScorer):
    """The golden-ranking oracle: scores come from a rankings store, per image, at evaluation time
    (:meth:`image_scores`); the encoder receives them as ``forward(pixels, patch_scores=...)``."""

    name = "golden"

    def forward(self, x, num_prefix, block):
        raise PrtoolError("the golden scorer needs per-image rankings (prtool eval --scorer golden --rankings DIR)")

    def image_scores(self, loaded, dataset, store, rank_block):
        if store is None:
            raise PrtoolError("--scorer golden needs --rankings DIR (a store made by `prtool rank`)")
        return golden_scores_for(dataset, store, loaded, rank_block)


class BrightnessScorer(PatchScorer):
    """Keep the brightest patches: a pixel-level heuristic the testbed must defeat (evaluation only)."""

    name = "brightness"

    def forward(self, x, num_prefix, block):
        raise PrtoolError("the brightness heuristic is computed from pixels in evaluation "
                          "(prtool eval --scorer brightness)")

    def image_scores(self, loaded, dataset, store, rank_block):
        return brightness_scores_for(loaded)


def golden_scores_for(dataset, store, loaded, rank_block: int):
    """``(pixels, rows) -> [b, N]`` oracle patch scores from a loaded rankings store (higher = ranked earlier).

    ``store`` is a ``RankingStore`` (``prtool.ranking.store.load_store``), read by the caller: the encoder's rankers
    do not import the ranking phase."""
    rankings = store.path
    idx = store.index
    if idx["rank_block"] != rank_block:
        raise PrtoolError(f"rankings {rankings} were computed at block {idx['rank_block']}, but the schedule's first "
                          f"stage is block {rank_block}: use a schedule starting at block {idx['rank_block']}")
    if idx["model_id"].get("checkpoint_sha256") != loaded.model_id.get("checkpoint_sha256") or \
            idx["model_id"].get("model") != loaded.name:
        raise PrtoolError(f"rankings {rankings} were computed for {idx['model_id']}, not {loaded.model_id}")
    where = store.row_of()
    n = store.rankings.shape[1]
    position_score = torch.arange(n, 0, -1, dtype=torch.float32)  # first in the ranking -> highest score

    def scores_for(pixels, rows) -> torch.Tensor:
        out = torch.empty(len(rows), n)
        for j, r in enumerate(rows):
            sid = dataset.sample_id(r)
            if sid not in where:
                raise PrtoolError(f"rankings {rankings} have no ranking for {sid}: rank this dataset/split first")
            out[j, torch.from_numpy(store.rankings[where[sid]])] = position_score
        return out

    return scores_for


def brightness_scores_for(loaded):
    """``(pixels, rows) -> [b, N]``: mean intensity of each patch (a naive saliency heuristic)."""
    pre = loaded.preprocess
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    patch = loaded.visual.conv1.kernel_size[0]

    def scores_for(pixels, rows) -> torch.Tensor:
        raw = (pixels * std + mean).mean(1, keepdim=True)  # [b, 1, H, W] in 0..1
        return torch.nn.functional.avg_pool2d(raw, patch).flatten(1)

    return scores_for
