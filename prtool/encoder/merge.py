"""Token merging math for rank-and-merge: pure tensor functions, no modules, no state.

Shapes: ``B`` batch, ``m`` kept tokens, ``r`` dropped tokens, ``D`` channels, ``H`` heads,
``T`` sequence length, ``hd`` head width. Sizes are float ``[B, tokens]``: how many original
patches a token stands for. Every count is a Python int, so exported graphs keep static shapes.

The scatter-add of a merge is written as a one-hot matmul (``Equal`` + ``MatMul`` in ONNX): no
``ScatterElements`` with a reduction, which TensorRT only runs through its plugin. The
``scatter`` formulation (``scatter_add``, ToMe's) is kept to measure against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MERGE_OPS = ("onehot", "scatter")


def most_similar(dropped: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Index of each dropped token's most similar kept token by cosine: ``[B, r, C], [B, m, C] -> [B, r]``.

    Exact ties go to the lowest kept index (ArgMax's first occurrence).
    """
    sim = F.normalize(dropped, dim=-1) @ F.normalize(kept, dim=-1).transpose(1, 2)  # [B, r, m]
    return sim.argmax(dim=-1)


def merge_into(kept: torch.Tensor, kept_size: torch.Tensor, dropped: torch.Tensor, dropped_size: torch.Tensor,
               target: torch.Tensor, op: str = "onehot") -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of each dropped token into ``kept[target]``.

    ``kept`` ``[B, m, D]``, ``kept_size`` ``[B, m]``, ``dropped`` ``[B, r, D]``, ``dropped_size``
    ``[B, r]``, ``target`` ``[B, r]`` int64 in ``0..m-1``. Returns ``(kept' [B, m, D], size' [B, m])``
    with ``kept'[i] = (s_i x_i + sum_{j -> i} s_j x_j) / (s_i + sum_{j -> i} s_j)``.
    """
    m = kept.shape[1]
    if op == "onehot":
        onehot = (target.unsqueeze(-1) == torch.arange(m, device=target.device)).to(kept.dtype)  # [B, r, m]
        weights = (onehot * dropped_size.unsqueeze(-1)).transpose(1, 2)  # [B, m, r]
        total = kept * kept_size.unsqueeze(-1) + weights @ dropped
        size = kept_size + weights.sum(-1)
    elif op == "scatter":
        d = kept.shape[-1]
        total = (kept * kept_size.unsqueeze(-1)).scatter_add(
            1, target.unsqueeze(-1).expand(-1, -1, d), dropped * dropped_size.unsqueeze(-1))
        size = kept_size.scatter_add(1, target, dropped_size)
    else:
        raise ValueError(f"unknown merge op {op!r}: use one of {MERGE_OPS}")
    return total / size.unsqueeze(-1), size


def fuse(tokens: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``tokens`` ``[B, r, D]`` (sizes ``[B, r]``) as one size-weighted token: ``([B, 1, D], [B, 1])``."""
    total = size.sum(1, keepdim=True)
    return (tokens * size.unsqueeze(-1)).sum(1, keepdim=True) / total.unsqueeze(-1), total


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor,
                           head_dim: int | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(hd) + log_size) v``: ``q, k, v`` ``[B, H, T, hd]``, ``log_size`` ``[B, 1, 1, T]``.

    The bias broadcasts over heads and queries: no ``[B * H, T, T]`` mask is materialised. Pass
    ``head_dim`` as a Python int when tracing (the scale is then a constant).
    """
    logits = (q * (1.0 / math.sqrt(head_dim or q.shape[-1]))) @ k.transpose(-1, -2) + log_size
    return torch.softmax(logits, dim=-1) @ v


def expanded_mask(size: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference form: ``+log(size)`` as a float attention mask ``[B * heads, T, T]``."""
    b, t = size.shape
    return size.log().view(b, 1, 1, t).expand(b, heads, t, t).reshape(b * heads, t, t)
