"""Rank-and-merge: Patch Ranking's single sorted ranking, with dropped tokens merged, not discarded.

At the first stage block the scorer ranks all N patches with one ``TopK(K = N, sorted)``: the first
``k_1`` are kept, the rest dropped, from one node. At every stage ``j`` the patch tokens past
``k_j`` (a static slice of the ranked order) are merged, not discarded (``prtool.encoder.merge``). The
shipped design (``target="fused"``) keeps the first ``k_j - 1`` and fuses the rest, the previous
stage's fused token included, into one size-weighted token at the end; ``target="tokens"``
merges each into its most similar kept token (cosine of the tokens; ``"keys"``: of the stage
block's keys). On the testbed the three score alike (benchmarks/README.md) and ``fused`` is the
cheapest graph (no similarity, ArgMax or one-hot). Token sizes are carried, and every block after
the first stage applies
proportional attention (``+log size`` on each key's logit, as ToMe does): that, not the merged
values, is what keeps the accuracy. The attention is written out from each open_clip block's own
``in_proj`` / ``out_proj`` weights with a ``[B, 1, 1, T]`` bias, so the export holds no
``[B * heads, T, T]`` mask; ``attention="mask"`` is that naive form, kept to measure against.

The state_dict keys are the tower's (plus ``scorer.*``): open_clip checkpoints load untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prtool.encoder.merge import MERGE_OPS, expanded_mask, fuse, merge_into, most_similar, proportional_attention
from prtool.encoder.pruned import PrunedVisionTransformer, gather_tokens
from prtool.errors import PrtoolError

TARGETS = ("fused", "tokens", "keys")
ATTENTIONS = ("explicit", "sdpa", "mask", "none")


def attention_block(blk: nn.Module, x: torch.Tensor, log_size: torch.Tensor, sdpa: bool = False) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on ``x`` ``[B, T, D]`` with ``+log_size`` ``[B, 1, 1, T]``
    on every key's logit, computed from the block's own weights (same result as ``blk(x, attn_mask=
    expanded_mask(size))``)."""
    attn = blk.attn
    heads, hd = attn.num_heads, attn.head_dim  # Python ints: constants in the exported graph
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [B, T, 3D]
    q, k, v = qkv.unflatten(-1, (3, heads, hd)).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, hd]
    if sdpa:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=log_size)
    else:
        o = proportional_attention(q, k, v, log_size, hd)
    o = attn.out_proj(o.transpose(1, 2).flatten(2))
    x = x + blk.ls_1(o)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class RankMergeVisionTransformer(PrunedVisionTransformer):
    """``forward(pixels [B, 3, H, W]) -> embeds [B, E]`` (and ``kept [B, k_final]``): see the module doc.

    ``target`` picks merge targets (``fused``, ``tokens``, ``keys``), ``attention`` how proportional
    attention is computed (``explicit``, ``sdpa``, ``mask``; ``none`` is the ablation without it),
    ``merge_op`` how the size-weighted sums are formed (``onehot`` matmul or ``scatter`` add).
    """

    def __init__(self, visual, schedule, scorer=None, gather: str = "flat", normalize: bool = False,
                 return_indices: bool = False, visual_prompts=None, target: str = "fused",
                 attention: str = "explicit", merge_op: str = "onehot"):
        super().__init__(visual, schedule, scorer, gather=gather, normalize=normalize,
                         return_indices=return_indices, visual_prompts=visual_prompts)
        for value, allowed, what in ((target, TARGETS, "merge target"), (attention, ATTENTIONS, "attention"),
                                     (merge_op, MERGE_OPS, "merge op")):
            if value not in allowed:
                raise PrtoolError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
        if target == "fused" and min(schedule.keep, default=2) < 2:
            raise PrtoolError("target fused keeps k - 1 patches plus one fused token: every stage must keep >= 2")
        self.target, self.attention, self.merge_op = target, attention, merge_op

    @classmethod
    def from_spec(cls, visual, spec, scorer, **kw):
        """As the base class, with the spec's merge design (``target``, ``attention``, ``merge_op``)."""
        return cls(visual, spec.schedule, scorer, gather=spec.gather, **kw, **(spec.merge or {}))

    def rank(self, x: torch.Tensor, block_index: int, patch_scores=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``TopK(N, sorted)`` of the scores: ``x`` with its patches in ranked order, and the order ``[B, N]``."""
        p = self.num_prefix
        if patch_scores is None:
            scores = self.scorer(x, p, self.transformer.resblocks[block_index])
        else:
            scores = patch_scores.to(x.dtype)
        order = torch.topk(scores, self.num_patches, dim=1, largest=True, sorted=True).indices
        return torch.cat([x[:, :p], gather_tokens(x[:, p:], order, self.gather)], dim=1), order

    def reduce(self, x: torch.Tensor, size: torch.Tensor, keep: int, block: nn.Module):
        """``[B, P + n, D]``, sizes ``[B, P + n]`` -> ``[B, P + keep, D]``, ``[B, P + keep]``; the prefix never
        merges."""
        p = self.num_prefix
        if self.target == "fused":
            fused, fused_size = fuse(x[:, p + keep - 1 :], size[:, p + keep - 1 :])
            return (torch.cat([x[:, : p + keep - 1], fused], dim=1),
                    torch.cat([size[:, : p + keep - 1], fused_size], dim=1))
        patches = x[:, p:]
        if self.target == "keys":
            from prtool.encoder.peers import block_keys

            metric = block_keys(patches, block)
        else:
            metric = patches
        dst = most_similar(metric[:, keep:], metric[:, :keep])
        merged, merged_size = merge_into(patches[:, :keep], size[:, p : p + keep], patches[:, keep:],
                                         size[:, p + keep :], dst, self.merge_op)
        return torch.cat([x[:, :p], merged], dim=1), torch.cat([size[:, :p], merged_size], dim=1)

    def run_block(self, blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None,
                  log_size: torch.Tensor | None) -> torch.Tensor:
        if size is None or self.attention == "none":
            return blk(x)
        if self.attention == "mask":
            return blk(x, attn_mask=expanded_mask(size, blk.attn.num_heads))
        return attention_block(blk, x, log_size, sdpa=self.attention == "sdpa")

    def forward_with_sizes(self, pixels: torch.Tensor, patch_scores=None):
        """``(embeds [B, E], order [B, N] or None, final sizes [B, P + k_final] or None)``."""
        x = self.embed(pixels)
        size = log_size = order = None
        for i, blk in enumerate(self.transformer.resblocks):
            if i in self._stage_keep:
                if order is None:
                    x, order = self.rank(x, i, patch_scores)
                    size = torch.ones_like(x[..., 0])
                x, size = self.reduce(x, size, self._stage_keep[i], blk)
                log_size = size.log().unsqueeze(1).unsqueeze(1)  # [B, 1, 1, T], once per stage
            x = self.run_block(blk, x, size, log_size)
        return self.pool(x), order, size

    def forward(self, pixels: torch.Tensor, patch_scores=None):
        pooled, order, _ = self.forward_with_sizes(pixels, patch_scores)
        if self.return_indices:
            return pooled, order[:, : self.schedule.final_keep]
        return pooled
