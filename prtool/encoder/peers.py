"""Peer token-reduction methods inside the same pruned encoder, at the same token counts.

Both reduce the non-protected tokens to exactly ``k_j`` before stage block ``j`` of the schedule,
so every block sees the same sequence length as Patch Ranking (apples-to-apples accuracy,
FLOPs and latency):

* ``EViTVisionTransformer`` (Liang et al., 2022): keep the ``k_j - 1`` tokens CLS attends to most
  in the stage block, fuse the rest into one token (their attention-weighted mean, appended last).
  The fused token counts as one of the ``k_j``.
* ``ToMeVisionTransformer`` (Bolya et al., 2023): bipartite soft matching on the stage block's
  keys merges ``removed_j`` tokens (size-weighted averages), then every later block uses
  proportional attention (``+ log(size)`` on the attention logits). ToMe merges inside a block,
  after attention; here the merge runs just before the stage block, on that block's keys, so the
  wrapper needs no change to open_clip's blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prtool.encoder.merge import expanded_mask
from prtool.encoder.pruned import PrunedVisionTransformer, gather_tokens
from prtool.encoder.scorers import cls_attention
from prtool.errors import PrtoolError


def block_keys(x: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """The keys ``block``'s attention computes for ``x`` (all heads concatenated): ``[B, T, D]``."""
    attn = block.attn
    dim = attn.embed_dim
    bias = attn.in_proj_bias[dim : 2 * dim] if attn.in_proj_bias is not None else None
    return F.linear(block.ln_1(x), attn.in_proj_weight[dim : 2 * dim], bias)


class _PeerEncoder(PrunedVisionTransformer):
    """Shared setup: peers take no scorer; the schedule says how many tokens each stage keeps."""

    needs_scorer = False

    def __init__(self, visual, schedule, gather: str = "flat", normalize: bool = False, visual_prompts=None):
        super().__init__(visual, schedule, scorer=None, gather=gather, normalize=normalize,
                         return_indices=False, visual_prompts=visual_prompts)

    @classmethod
    def from_spec(cls, visual, spec, scorer, return_indices: bool = False, **kw):
        if return_indices:
            raise PrtoolError(f"{spec.scorer} merges or fuses tokens: it has no kept_patch_indices output")
        return cls(visual, spec.schedule, gather=spec.gather, **kw)

    @property
    def expected_topk_nodes(self) -> int:
        return len(self.schedule.stages)  # one ranking per stage


class EViTVisionTransformer(_PeerEncoder):
    def reduce(self, x: torch.Tensor, block: nn.Module, n: int, keep: int) -> torch.Tensor:
        """``[B, P + n, D] -> [B, P + keep, D]``: top-(keep-1) by CLS attention + one fused token.

        ``n`` and ``keep`` are Python ints (static), so every TopK's K is a graph constant.
        """
        p = self.num_prefix
        attn = cls_attention(x, block, p)  # [B, n]
        order = torch.topk(attn, n, dim=1, largest=True, sorted=True).indices
        kept_idx, drop_idx = order[:, : keep - 1], order[:, keep - 1 :]
        patches = x[:, p:]
        kept = gather_tokens(patches, kept_idx, self.gather)
        dropped = gather_tokens(patches, drop_idx, self.gather)
        w = torch.gather(attn, 1, drop_idx).unsqueeze(-1)  # [B, n - keep + 1, 1]
        fused = (dropped * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.cat([x[:, :p], kept, fused], dim=1)

    def forward(self, pixels: torch.Tensor, patch_scores=None):
        x = self.embed(pixels)
        n = self.num_patches
        for i, blk in enumerate(self.transformer.resblocks):
            if i in self._stage_keep:
                x = self.reduce(x, blk, n, self._stage_keep[i])
                n = self._stage_keep[i]
            x = blk(x)
        return self.pool(x)


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protected: int, n: int):
    """ToMe's bipartite soft matching: merge ``r`` tokens of ``x`` ``[B, T, D]`` (sizes ``[B, T]``).

    The first ``protected`` tokens never merge; ``n`` (a Python int) is the number of the others.
    Alternate tokens form sets A and B; each A token's
    most similar B token (cosine of ``metric``) is its edge; the ``r`` best edges merge their A
    token into the B token as size-weighted averages. Returns ``(x [B, T - r, D], size [B, T - r])``.
    """
    prefix_x, prefix_s = x[:, :protected], size[:, :protected]
    t, s, m = x[:, protected:], size[:, protected:], F.normalize(metric[:, protected:], dim=-1)
    a_x, b_x, a_s, b_s = t[:, ::2], t[:, 1::2], s[:, ::2], s[:, 1::2]
    na = (n + 1) // 2
    if r > na:
        raise PrtoolError(f"ToMe can merge at most {na} of {n} tokens in one stage (asked {r}): "
                          "spread the removal over more stages")
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # [B, na, nb]
    node_max, node_idx = scores.max(dim=-1)
    edge_order = torch.topk(node_max, na, dim=1, largest=True, sorted=True).indices
    src_idx, unm_idx = edge_order[:, :r], edge_order[:, r:]
    dst_idx = torch.gather(node_idx, 1, src_idx)  # [B, r]
    d = x.shape[-1]
    weighted_a = a_x * a_s.unsqueeze(-1)
    src_x = torch.gather(weighted_a, 1, src_idx.unsqueeze(-1).expand(-1, -1, d))
    src_s = torch.gather(a_s, 1, src_idx)
    b_sum = (b_x * b_s.unsqueeze(-1)).scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, d), src_x)
    b_size = b_s.scatter_add(1, dst_idx, src_s)
    b_new = b_sum / b_size.unsqueeze(-1)
    unm_x = torch.gather(a_x, 1, unm_idx.unsqueeze(-1).expand(-1, -1, d))
    unm_s = torch.gather(a_s, 1, unm_idx)
    return torch.cat([prefix_x, unm_x, b_new], dim=1), torch.cat([prefix_s, unm_s, b_size], dim=1)


class ToMeVisionTransformer(_PeerEncoder):
    def forward_with_sizes(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and the final token sizes ``[B, T]`` (how many patches each token stands for)."""
        x = self.embed(pixels)
        size = torch.ones(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        removed = dict(self.schedule.stages)
        merged = False
        n = self.num_patches
        for i, blk in enumerate(self.transformer.resblocks):
            if i in removed:
                x, size = bipartite_merge(x, size, block_keys(x, blk), removed[i], self.num_prefix, n)
                n -= removed[i]
                merged = True
            x = blk(x, attn_mask=expanded_mask(size, blk.attn.num_heads) if merged else None)
        return self.pool(x), size

    def forward(self, pixels: torch.Tensor, patch_scores=None):
        return self.forward_with_sizes(pixels)[0]


class StaticKeepVisionTransformer(_PeerEncoder):
    """Keeps the first ``k_j`` patches by index: same token counts, no scoring, no TopK, no gather.

    Useless for accuracy; it is the timing twin that isolates the cost of the pruning machinery.
    """

    @property
    def expected_topk_nodes(self) -> int:
        return 0

    def forward(self, pixels: torch.Tensor, patch_scores=None):
        x = self.embed(pixels)
        for i, blk in enumerate(self.transformer.resblocks):
            if i in self._stage_keep:
                x = x[:, : self.num_prefix + self._stage_keep[i]]
            x = blk(x)
        return self.pool(x)

