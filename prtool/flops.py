"""Analytic cost of the image encoder: multiply-accumulates (MACs) per image; FLOPs = 2 x MACs.

Per transformer block with n tokens of width D: ``12 n D^2`` (QKV, output projection, 4x MLP)
plus ``2 n^2 D`` (attention scores and weighted sum). Plus the patch embedding ``N * 3 p^2 * D``,
the output projection ``D * E`` and the scorer. torch's FlopCounterMode misses fused attention on
CPU, hence the formula. ViT-B/16 at 224: 17.56 GMACs unpruned.
"""

from __future__ import annotations

from prtool.schedule import Schedule


def block_macs(n: int, dim: int) -> int:
    return 12 * n * dim * dim + 2 * n * n * dim


def encoder_macs(schedule: Schedule, dim: int, patch_size: int, embed_dim: int, num_prefix: int = 1,
                 scorer_macs: int = 0) -> dict:
    """MACs per image, split into parts, for an encoder pruned by ``schedule``."""
    tokens = schedule.tokens_per_block(num_prefix)
    blocks = sum(block_macs(n, dim) for n in tokens)
    patch = schedule.num_patches * 3 * patch_size * patch_size * dim
    head = dim * embed_dim
    total = blocks + patch + head + (scorer_macs if not schedule.is_empty else 0)
    return {"gmacs": total / 1e9, "gflops": 2 * total / 1e9, "blocks_gmacs": blocks / 1e9,
            "patch_embed_gmacs": patch / 1e9, "head_gmacs": head / 1e9,
            "scorer_gmacs": (scorer_macs if not schedule.is_empty else 0) / 1e9, "tokens_per_block": tokens}


def encoder_cost(encoder) -> dict:
    """:func:`encoder_macs` for a ``PrunedVisionTransformer`` (its scorer's cost included)."""
    patch = encoder.conv1.kernel_size[0]
    embed = encoder.proj.shape[1] if encoder.proj is not None else encoder.width
    scorer_macs = 0
    pred = getattr(encoder.scorer, "predictor", None)
    if pred is not None:
        scorer_macs = pred.macs()
    elif encoder.scorer is not None and encoder.scorer.name == "cls-attn":
        n = encoder.schedule.num_patches + encoder.num_prefix
        scorer_macs = 2 * n * encoder.width * encoder.width + n * encoder.width  # ln_1 + q/k projections + scores
    return encoder_macs(encoder.schedule, encoder.width, patch, embed, encoder.num_prefix, scorer_macs)
