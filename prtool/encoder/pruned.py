"""``PrunedVisionTransformer``: an open_clip ViT image tower that keeps the top-k patch tokens.

At the first stage block a scorer gives ``[B, N]`` patch scores; one ``TopK(k1, sorted)`` and a
gather keep k1 patch tokens, ordered by score. Every later stage keeps a static prefix of them
(the first k_j), which equals ranking again with the same scores. Protected tokens (CLS and
learnable visual tokens) stay in front of the sequence and are never scored or dropped.

The wrapper shares the tower's modules under their own names (``conv1``, ``transformer``, ...),
so its ``state_dict`` keys are the tower's keys (plus ``scorer.*`` for a learned scorer) and
open_clip checkpoints load untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prtool.encoder.schedule import Schedule
from prtool.encoder.scorers import PatchScorer
from prtool.errors import PrtoolError

GATHER_MODES = ("flat", "elements", "nd")


def check_supported_tower(visual: nn.Module) -> None:
    """Fail loudly if open_clip's VisionTransformer no longer has the structure prtool relies on."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    missing = [n for n in needed if not hasattr(visual, n)]
    if missing:
        raise PrtoolError(f"this open_clip VisionTransformer lacks {missing}: prtool supports open_clip 3.0-3.3")
    if getattr(visual, "attn_pool", None) is not None:
        raise PrtoolError("image towers with an attentional pooler (CoCa) are not supported: use a CLS-pooled ViT")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise PrtoolError(f"pool type {visual.pool_type!r} is not supported: prtool prunes CLS-pooled ViTs")
    if not getattr(visual.transformer, "batch_first", True):
        raise PrtoolError("sequence-first transformers are not supported: open_clip >= 2.24 runs batch-first")
    for blk in visual.transformer.resblocks:
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
            raise PrtoolError("custom attention blocks are not supported: prtool needs open_clip's default ViT blocks")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, mode: str = "flat") -> torch.Tensor:
    """Gather ``x[b, idx[b, j]]``: ``x`` ``[B, N, D]``, ``idx`` ``[B, k]`` int64 -> ``[B, k, D]``.

    ``flat`` flattens to ``[B*N, D]``, adds per-batch offsets and uses one plain Gather (every
    runtime runs it); ``elements`` is GatherElements; ``nd`` is advanced indexing, which the dynamo
    exporter emits as GatherND and the TorchScript exporter lowers to a flattened Gather.
    """
    n, d = x.shape[1], x.shape[2]
    k = idx.shape[1]
    if mode == "flat":
        offsets = torch.arange(x.shape[0], device=x.device, dtype=idx.dtype).unsqueeze(1) * n
        flat = x.reshape(-1, d).index_select(0, (idx + offsets).reshape(-1))
        return flat.reshape(-1, k, d)
    if mode == "elements":
        return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, d))
    if mode == "nd":
        rows = torch.arange(x.shape[0], device=x.device, dtype=idx.dtype).unsqueeze(1).expand(-1, k)
        return x[rows, idx]
    raise PrtoolError(f"unknown gather mode {mode!r}: use one of {', '.join(GATHER_MODES)}")


class PrunedVisionTransformer(nn.Module):
    """``forward(pixels [B, 3, H, W]) -> embeds [B, E]`` (and ``kept [B, k_final]`` int64).

    ``schedule`` fixes every k; ``scorer`` is needed unless the schedule is empty;
    ``visual_prompts`` ``[P, D]`` are extra protected tokens inserted after CLS.
    """

    needs_scorer = True  # peer methods (prtool.encoder.peers) reduce tokens themselves

    def __init__(self, visual: nn.Module, schedule: Schedule, scorer: PatchScorer | None = None,
                 gather: str = "flat", normalize: bool = False, return_indices: bool = False,
                 visual_prompts: torch.Tensor | None = None):
        super().__init__()
        check_supported_tower(visual)
        if gather not in GATHER_MODES:
            raise PrtoolError(f"unknown gather mode {gather!r}: use one of {', '.join(GATHER_MODES)}")
        grid = visual.grid_size
        num_patches = grid[0] * grid[1]
        depth = len(visual.transformer.resblocks)
        if schedule.num_patches != num_patches or schedule.depth != depth:
            raise PrtoolError(
                f"schedule made for {schedule.num_patches} patches / {schedule.depth} blocks, but the model has "
                f"{num_patches} patches / {depth} blocks"
            )
        if not schedule.is_empty and scorer is None and self.needs_scorer:
            raise PrtoolError("a pruning schedule needs a scorer (--scorer predictor|cls-attn)")
        if return_indices and schedule.is_empty:
            raise PrtoolError("--with-kept-indices needs a pruning schedule: the unpruned model keeps every patch")
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.scorer = scorer
        self.schedule = schedule
        self.gather = gather
        self.normalize = normalize
        self.return_indices = return_indices
        self.num_patches = num_patches
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size,) * 2
        if visual_prompts is not None:
            self.register_buffer("visual_prompts", visual_prompts.detach().clone(), persistent=True)
        else:
            self.visual_prompts = None
        self._stage_keep = dict(zip(schedule.blocks, schedule.keep))

    @classmethod
    def from_spec(cls, visual: nn.Module, spec, scorer: PatchScorer | None, **kw) -> PrunedVisionTransformer:
        """The encoder an ``EncoderSpec`` describes (``prtool.encoder.methods`` builds every method through this);
        ``kw``: ``normalize``, ``return_indices``, ``visual_prompts``."""
        return cls(visual, spec.schedule, scorer, gather=spec.gather, **kw)

    @property
    def expected_topk_nodes(self) -> int:
        """TopK nodes the exported graph must hold: one at the first stage, none unpruned."""
        return 0 if self.schedule.is_empty else 1

    @property
    def num_prefix(self) -> int:
        return 1 + (0 if self.visual_prompts is None else self.visual_prompts.shape[0])

    @property
    def width(self) -> int:
        return self.class_embedding.shape[0]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions (+ prompts) + ``ln_pre``: ``[B, P + N, D]``."""
        x = self.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.visual_prompts is not None:
            prompts = self.visual_prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        return self.ln_pre(x)

    def tokens_before(self, pixels: torch.Tensor, block: int) -> torch.Tensor:
        """The full (unpruned) sequence entering ``block``: ``[B, P + N, D]``."""
        x = self.embed(pixels)
        for blk in self.transformer.resblocks[:block]:
            x = blk(x)
        return x

    def pool(self, x: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        """``ln_post(CLS) @ proj`` for ``[B, T, D]`` tokens -> ``[B, E]``, L2-normalized if asked
        (default: as the encoder was built)."""
        pooled = self.ln_post(x[:, 0])
        if self.proj is not None:
            pooled = pooled @ self.proj
        normalize = self.normalize if normalize is None else normalize
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def first_stage_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """The scorer's ``[B, N]`` patch scores at the first stage (for pictures and validation)."""
        block = self.schedule.first_block
        x = self.tokens_before(pixels, block)
        return self.scorer(x, self.num_prefix, self.transformer.resblocks[block])

    def select(self, x: torch.Tensor, block_index: int,
               patch_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """First stage: score, TopK(k1, sorted) and gather. Returns ``(x, kept_idx [B, k1])``.

        ``patch_scores`` ``[B, N]`` overrides the scorer (the golden-ranking oracle in evaluation).
        """
        p = self.num_prefix
        k1 = self._stage_keep[block_index]
        if patch_scores is None:
            scores = self.scorer(x, p, self.transformer.resblocks[block_index])
        else:
            scores = patch_scores.to(x.dtype)
        idx = torch.topk(scores, k1, dim=1, largest=True, sorted=True).indices
        return torch.cat([x[:, :p], gather_tokens(x[:, p:], idx, self.gather)], dim=1), idx

    def forward(self, pixels: torch.Tensor, patch_scores: torch.Tensor | None = None):
        x = self.embed(pixels)
        p = self.num_prefix
        kept = None
        for i, blk in enumerate(self.transformer.resblocks):
            if i in self._stage_keep:
                if kept is None:
                    x, kept = self.select(x, i, patch_scores)
                else:
                    x = x[:, : p + self._stage_keep[i]]
            x = blk(x)
        pooled = self.pool(x)
        if self.return_indices:
            return pooled, kept[:, : self.schedule.final_keep]
        return pooled
