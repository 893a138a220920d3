"""Patch scorers: who decides which patch tokens survive the first pruning stage.

A scorer sees the full sequence entering the first stage block, ``x`` ``[B, T, D]`` with
``num_prefix`` protected tokens in front (CLS, learnable visual tokens), and the block itself;
it returns one score per patch token, ``[B, N]`` with ``N = T - num_prefix``. Higher scores are
kept. Scorers hold no per-forward state, so the exported graph is a pure function of the image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prtool.errors import PrtoolError
from prtool.predictor import RankingPredictor


class PatchScorer(nn.Module):
    """Interface: ``forward(x, num_prefix, block) -> [B, N]`` scores."""

    name = "scorer"
    exportable = True
    why_not_exportable = ""

    def forward(self, x: torch.Tensor, num_prefix: int, block: nn.Module) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class PredictorScorer(PatchScorer):
    """The Mix-MLP ranking predictor on the patch tokens (protected tokens never reach it)."""

    name = "predictor"

    def __init__(self, predictor: RankingPredictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, x, num_prefix, block):
        return self.predictor(x[:, num_prefix:])


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


class RandomScorer(PatchScorer):
    """Uniform random scores from a seeded generator (a baseline; evaluation only)."""

    name = "random"
    exportable = False
    why_not_exportable = "random keep is a PyTorch-only baseline (ONNX random ops are not reproducible across runtimes)"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def forward(self, x, num_prefix, block):
        n = x.shape[1] - num_prefix
        return torch.rand(x.shape[0], n, generator=self._gen).to(x.device)


class GoldenScorer(PatchScorer):
    """The golden-ranking oracle: scores come from a rankings store, per image, at evaluation time.

    The encoder receives them as ``forward(pixels, patch_scores=...)``; called without them it fails.
    """

    name = "golden"
    exportable = False
    why_not_exportable = "the golden ranking is an oracle computed per image offline; export a trained predictor"

    def forward(self, x, num_prefix, block):
        raise PrtoolError("the golden scorer needs per-image rankings (prtool eval --scorer golden --rankings DIR)")


class BrightnessScorer(GoldenScorer):
    """Keep the brightest patches: a pixel-level heuristic the testbed must defeat (evaluation only)."""

    name = "brightness"
    why_not_exportable = "brightness is an evaluation heuristic computed from pixels, not a deployable scorer"

    def forward(self, x, num_prefix, block):
        raise PrtoolError("the brightness heuristic is computed from pixels in evaluation (prtool eval --scorer brightness)")


SCORERS = ("predictor", "cls-attn", "random", "golden", "brightness")
