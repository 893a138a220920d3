"""Analytic cost of the image encoder: multiply-accumulates (MACs) per image; FLOPs = 2 x MACs.

Per transformer block with n tokens of width D: ``12 n D^2`` (QKV, output projection, 4x MLP)
plus ``2 n^2 D`` (attention scores and weighted sum). Plus the patch embedding ``N * 3 p^2 * D``,
the output projection ``D * E`` and the scorer. The peers' own selection work is counted too, per
stage with ``n`` tokens entering: EViT's CLS attention (keys and scores, ``2 n D^2 + n D``) and
fused token; ToMe's keys ``n D^2``, bipartite similarities ``ceil(n/2) floor(n/2) D`` and merges;
rank-and-merge's similarities ``r k D`` and one-hot merge ``r k D`` per stage (``r`` merged into
``k`` kept; plus ``n D^2`` for key targets), and its ``+log size`` bias (``H T^2`` adds) in every
later block.
torch's FlopCounterMode misses fused attention on CPU, hence the formula. ViT-B/16 at 224:
17.56 GMACs unpruned.
"""

from __future__ import annotations

from prtool.encoder.schedule import Schedule


def block_macs(n: int, dim: int) -> int:
    return 12 * n * dim * dim + 2 * n * n * dim


def encoder_macs(schedule: Schedule, dim: int, patch_size: int, embed_dim: int, num_prefix: int = 1,
                 scorer_macs: int = 0, selection_macs: int = 0) -> dict:
    """MACs per image, split into parts, for an encoder pruned by ``schedule``."""
    tokens = schedule.tokens_per_block(num_prefix)
    blocks = sum(block_macs(n, dim) for n in tokens)
    patch = schedule.num_patches * 3 * patch_size * patch_size * dim
    head = dim * embed_dim
    scorer = scorer_macs if not schedule.is_empty else 0
    selection = selection_macs if not schedule.is_empty else 0
    total = blocks + patch + head + scorer + selection
    return {"gmacs": total / 1e9, "gflops": 2 * total / 1e9, "blocks_gmacs": blocks / 1e9,
            "patch_embed_gmacs": patch / 1e9, "head_gmacs": head / 1e9,
            "scorer_gmacs": scorer / 1e9, "selection_gmacs": selection / 1e9, "tokens_per_block": tokens}


def peer_selection_macs(method: str, schedule: Schedule, dim: int, num_prefix: int = 1) -> int:
    """MACs EViT or ToMe spend choosing and fusing tokens (0 for other methods)."""
    if method not in ("evit", "tome"):
        return 0
    total, n = 0, schedule.num_patches
    for _, removed in schedule.stages:
        t = n + num_prefix
        if method == "evit":
            total += 2 * t * dim * dim + t * dim + (removed + 1) * dim  # CLS attention + fused token
        else:
            total += t * dim * dim + ((n + 1) // 2) * (n // 2) * dim + removed * dim  # keys + matching + merge
        n -= removed
    return total


def merge_selection_macs(schedule: Schedule, dim: int, target: str, heads: int, num_prefix: int = 1) -> int:
    """MACs rank-and-merge spends merging (``prtool.encoder.rank_merge``), its proportional-attention bias included."""
    total, n = 0, schedule.num_patches
    for _, removed in schedule.stages:
        k = n - removed
        if target == "fused":
            total += (removed + 1) * dim
        else:
            total += 2 * removed * k * dim + (n + k) * dim + (n * dim * dim if target == "keys" else 0)
        n = k
    first = schedule.first_block if schedule.stages else schedule.depth
    tokens = schedule.tokens_per_block(num_prefix)
    return total + sum(heads * t * t for t in tokens[first:])


def no_selection_macs(encoder) -> int:
    """Methods that only rank (or keep everything): their ranker's cost is the scorer's, not a selection's."""
    return 0


def evit_selection_macs(encoder) -> int:
    return peer_selection_macs("evit", encoder.schedule, encoder.width, encoder.num_prefix)


def tome_selection_macs(encoder) -> int:
    return peer_selection_macs("tome", encoder.schedule, encoder.width, encoder.num_prefix)


def rank_merge_selection_macs(encoder) -> int:
    heads = encoder.transformer.resblocks[0].attn.num_heads
    return merge_selection_macs(encoder.schedule, encoder.width, encoder.target, heads, encoder.num_prefix)


def encoder_cost(encoder) -> dict:
    """:func:`encoder_macs` for a ``PrunedVisionTransformer``: its ranker's cost (``scorer.macs``) and its
    method's selection cost (the ``flops`` rule of its ``prtool.encoder.methods`` entry, set by
    ``build_pruned_encoder``; an encoder built outside the table counts none)."""
    patch = encoder.conv1.kernel_size[0]
    embed = encoder.proj.shape[1] if encoder.proj is not None else encoder.width
    scorer_macs = encoder.scorer.macs(encoder) if encoder.scorer is not None else 0
    method = getattr(encoder, "method", None)
    selection = method.flops(encoder) if method is not None else 0
    return encoder_macs(encoder.schedule, encoder.width, patch, embed, encoder.num_prefix, scorer_macs, selection)
