"""A-ViT (Yin et al., CVPR 2022, "A-ViT: Adaptive Tokens for Efficient Vision Transformer") in the pruned
encoder family: adaptive token halting, and its fixed-k form that exports like the other rankers.

After every block ``l`` each patch token ``k`` gets a halting score ``h = sigmoid(gamma * x[k, 0] + beta)``
from the first channel of its residual stream (``gamma``, ``beta``: two scalars shared by all blocks, as
in the paper; the last block forces ``h = 1``). Scores accumulate; a token halts once its cumulative
score reaches ``threshold`` (the paper's ``1 - eps``). A halted token is no longer updated (its state is
frozen) and no longer attended to (its key gets a ``-1e9`` logit): the masking form, A-ViT proper,
exact, and as costly as the unpruned model in a fixed-shape graph. CLS (and prompt tokens) never halt:
the embedding is ``ln_post(CLS) @ proj`` after the last block, as for every method here.

Training losses (``halting_losses``): the ponder loss ``rho_k = N_k + R_k`` (blocks a token ran plus
its remainder at halting) and the distributional prior, ``KL(target || H)`` where ``H[l]`` is the
mean halting score at block ``l`` (normalised over blocks) and the target a Gaussian over blocks.

Equal cost: the threshold of each schedule is calibrated (``prtool.tuning.avit_train.calibrate_threshold``)
so that the mean number of active patch tokens per block equals the schedule's.

``AViTTopKVisionTransformer`` is the deployable form: the same halting scores accumulate, and at each
schedule stage one ``TopK(k_j, sorted)`` keeps the ``k_j`` tokens with the lowest cumulative halting
score (the least halted), with static shapes, so A-ViT becomes a ranker like Patch Ranking or EViT.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from prtool.encoder.pruned import PrunedVisionTransformer, gather_tokens
from prtool.encoder.rank_merge import attention_block
from prtool.errors import PrtoolError

HALTED_LOGIT = -1e9  # a halted key's attention logit: exp() underflows to exactly 0


class HaltingHead(nn.Module):
    """``h = sigmoid(gamma * x[..., 0] + beta)``: the paper's halting score, two scalars for every block."""

    def __init__(self, gamma: float = 1.0, beta: float = -2.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gamma * x[..., 0] + self.beta)


def gaussian_prior(depth: int, mean: float, std: float = 1.0) -> torch.Tensor:
    """The distributional prior: a Gaussian over block indices ``0..depth-1``, normalised to sum 1."""
    blocks = torch.arange(depth, dtype=torch.float32)
    p = torch.exp(-0.5 * ((blocks - mean) / std) ** 2)
    return p / p.sum()


def prior_mean_for(schedule) -> float:
    """The block index where an average token should halt so its depth matches ``schedule``'s mean
    token count: a token running ``m`` blocks halts after block ``m - 1``."""
    mean_active = sum(schedule.tokens_per_block(0)) / schedule.depth
    return schedule.depth * mean_active / schedule.num_patches - 1


class AViTVisionTransformer(PrunedVisionTransformer):
    """A-ViT proper (the masking form): ``forward(pixels) -> embeds [B, E]``.

    ``schedule`` is the budget the ``threshold`` was calibrated for (cost accounting only: the halting
    is data-dependent). ``straight_through`` (training) gives each active key a zero-valued
    ``log R_k - stop_grad(log R_k)`` bias, so the task loss reaches the halting scores.
    """

    needs_scorer = False

    def __init__(self, visual, schedule, halting: HaltingHead, threshold: float = 0.99, gather: str = "flat",
                 normalize: bool = False, visual_prompts=None):
        super().__init__(visual, schedule, scorer=None, gather=gather, normalize=normalize,
                         return_indices=False, visual_prompts=visual_prompts)
        if not threshold > 0:
            raise PrtoolError(f"A-ViT halting threshold {threshold} must be > 0 (the paper's 1 - eps is 0.99)")
        self.halting = halting
        self.threshold = float(threshold)
        self.straight_through = False

    @property
    def expected_topk_nodes(self) -> int:
        return 0  # masks, never selects

    def key_bias(self, active: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 1, P + N]``: 0 for CLS/prompts and active tokens, ``HALTED_LOGIT`` for halted ones."""
        bias = (1 - active) * HALTED_LOGIT
        if self.straight_through and self.training:
            log_r = remainder.clamp_min(1e-3).log()
            bias = bias + active * (log_r - log_r.detach())
        prefix = bias.new_zeros(bias.shape[0], self.num_prefix)
        return torch.cat([prefix, bias], dim=1)[:, None, None, :]

    def forward_halting(self, pixels: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, dict]:
        """``(embeds, info)``; ``info``: ``active [B, L]`` patch tokens entering each block, ``rho [B, N]``
        ponder costs, ``h_mean [L]`` mean halting score per block, ``cumulative [B, N]`` final scores,
        ``tokens [B, P + N, D]`` the final token states."""
        thr = self.threshold if threshold is None else threshold
        x = self.embed(pixels)
        b, p, n = x.shape[0], self.num_prefix, self.num_patches
        cum, rho = x.new_zeros(b, n), x.new_zeros(b, n)
        rem, active = x.new_ones(b, n), x.new_ones(b, n)
        counts, h_means = [], []
        blocks = self.transformer.resblocks
        for i, blk in enumerate(blocks):
            counts.append(active.sum(1))
            out = attention_block(blk, x, self.key_bias(active, rem))
            upd = torch.cat([active.new_ones(b, p), active], dim=1).unsqueeze(-1)
            x = upd * out + (1 - upd) * x  # halted tokens are not updated
            h_raw = self.halting(x[:, p:]) * active
            h_means.append(h_raw.mean())  # halted tokens count 0: the halting mass at block i
            h = active if i == len(blocks) - 1 else h_raw  # every token halts at the last block
            rho = rho + active
            cum = cum + h
            reached = (cum >= thr).to(x.dtype) * active
            rho = rho + rem * reached
            not_reached = active * (1 - reached)
            rem = rem - h * not_reached
            active = not_reached.detach()
        info = {"active": torch.stack(counts, 1), "rho": rho, "h_mean": torch.stack(h_means), "cumulative": cum,
                "tokens": x}
        return self.pool(x), info

    def forward(self, pixels: torch.Tensor, patch_scores=None):
        return self.forward_halting(pixels)[0]


def halting_losses(info: dict, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ponder, distribution)``: mean ``rho`` over tokens and images, and ``KL(prior || H)`` with ``H`` the
    per-block mean halting score normalised over blocks (clamped as A-ViT's code does)."""
    ponder = info["rho"].float().mean()
    h_mean = info["h_mean"].float()
    dist = h_mean / h_mean.sum().clamp_min(1e-6)
    dist = dist.clamp(0.01, 0.99)
    kl = (prior * (prior.clamp_min(1e-12).log() - dist.log())).sum()
    return ponder, kl


class AViTTopKVisionTransformer(PrunedVisionTransformer):
    """The fixed-k form: halting scores accumulate as in A-ViT; at each stage block one ``TopK(k_j)``
    keeps the tokens least halted (lowest cumulative score), gathered with their scores. No token is
    masked: every kept token runs every block, as in the other methods."""

    needs_scorer = False

    def __init__(self, visual, schedule, halting: HaltingHead, gather: str = "flat", normalize: bool = False,
                 return_indices: bool = False, visual_prompts=None):
        super().__init__(visual, schedule, scorer=None, gather=gather, normalize=normalize,
                         return_indices=return_indices, visual_prompts=visual_prompts)
        self.halting = halting

    @property
    def expected_topk_nodes(self) -> int:
        return len(self.schedule.stages)  # one TopK per stage: the scores change between stages

    def forward(self, pixels: torch.Tensor, patch_scores=None):
        x = self.embed(pixels)
        p = self.num_prefix
        cum = x.new_zeros(x.shape[0], self.num_patches)
        idx = torch.arange(self.num_patches, device=x.device).expand(x.shape[0], -1)  # original patch index
        for i, blk in enumerate(self.transformer.resblocks):
            if i in self._stage_keep:
                keep = self._stage_keep[i]
                order = torch.topk(-cum, keep, dim=1, largest=True, sorted=True).indices
                x = torch.cat([x[:, :p], gather_tokens(x[:, p:], order, self.gather)], dim=1)
                cum = torch.gather(cum, 1, order)
                idx = torch.gather(idx, 1, order)
            x = blk(x)
            cum = cum + self.halting(x[:, p:])
        pooled = self.pool(x)
        if self.return_indices:
            return pooled, idx
        return pooled


# ---- the tuned parameters: gamma/beta, LayerNorms, and row 0 (the halting channel) of each block's outputs ----

ROW0_PARAMS = ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def tuned_parameters(visual: nn.Module) -> dict[str, nn.Parameter]:
    """The visual tower's parameters A-ViT fine-tunes here: every LayerNorm except ``ln_post`` (the output
    space stays the text tower's), and the output projections of every block, of which only row 0 (what
    writes the halting channel ``x[..., 0]``) is trained and saved."""
    out = {}
    for name, mod in visual.named_modules():
        if isinstance(mod, nn.LayerNorm) and not name.startswith("ln_post"):
            out[f"{name}.weight"], out[f"{name}.bias"] = mod.weight, mod.bias
    for i, blk in enumerate(visual.transformer.resblocks):
        for suffix in ROW0_PARAMS:
            out[f"transformer.resblocks.{i}.{suffix}"] = blk.get_parameter(suffix)
    return out


def is_row0(name: str) -> bool:
    return name.split(".", 3)[-1] in ROW0_PARAMS


def tuned_state(halting: HaltingHead, visual: nn.Module) -> dict[str, torch.Tensor]:
    """What the weights file holds: ``halting.*``, full LayerNorm tensors, row 0 of the output projections."""
    state = {"halting.gamma": halting.gamma.detach().clone(), "halting.beta": halting.beta.detach().clone()}
    for name, prm in tuned_parameters(visual).items():
        state[name] = (prm.detach()[0:1] if is_row0(name) else prm.detach()).clone().contiguous()
    return state


def apply_tuned_state(visual: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, HaltingHead]:
    """A copy of ``visual`` with ``state`` written in, and the halting head (the shared tower is untouched)."""
    visual = copy.deepcopy(visual)
    params = tuned_parameters(visual)
    missing = sorted(set(params) - set(state)) + [k for k in ("halting.gamma", "halting.beta") if k not in state]
    if missing:
        raise PrtoolError(f"A-ViT weights lack {missing[:3]}: pass a file written by `prtool tune-avit` for this model")
    with torch.no_grad():
        for name, prm in params.items():
            val = state[name]
            target = prm[0:1] if is_row0(name) else prm
            if tuple(val.shape) != tuple(target.shape):
                raise PrtoolError(f"A-ViT weights {name} has shape {tuple(val.shape)}, the model {tuple(target.shape)}:"
                                  " pass a file written by `prtool tune-avit` for this model")
            target.copy_(val)
    halting = HaltingHead(float(state["halting.gamma"]), float(state["halting.beta"]))
    return visual, halting


def shipped_avit_path() -> Path:
    from prtool.testbed import spec as tbspec

    return tbspec.ASSETS / "avit.safetensors"


def load_avit(path: Path, loaded) -> tuple[dict, dict]:
    """``(state, meta)`` of a ``prtool tune-avit`` file, checked against ``loaded``'s weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, meta_path = Path(path), Path(path).with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise PrtoolError(f"A-ViT weights {path} (and {meta_path.name} beside it) not found: run `prtool tune-avit`")
    try:
        state, meta = load_file(str(path)), json.loads(meta_path.read_text())
    except (SafetensorError, ValueError, OSError) as exc:
        raise PrtoolError(f"cannot read A-ViT weights {path} ({exc.__class__.__name__}): "
                          "rerun `prtool tune-avit`") from None
    if meta.get("model_id", {}).get("checkpoint_sha256") != loaded.checkpoint_sha256:
        raise PrtoolError(f"A-ViT weights {path} were tuned for {meta.get('model_id')}, not {loaded.model_id}: "
                          "run `prtool tune-avit` for this model")
    return state, meta


def build_avit(loaded, spec, normalize: bool = True, return_indices: bool = False, visual_prompts=None):
    """The ``avit`` (masking) or ``avit-topk`` (fixed-k) encoder of ``spec`` (weights: ``spec.predictor_path``
    if given, else the testbed's shipped file): the ``builder`` of both entries in ``prtool.encoder.methods``."""
    path = spec.predictor_path or shipped_avit_path()
    state, meta = load_avit(path, loaded)
    visual, halting = apply_tuned_state(loaded.visual, state)
    if spec.scorer == "avit-topk":
        return AViTTopKVisionTransformer(visual, spec.schedule, halting, gather=spec.gather, normalize=normalize,
                                         return_indices=return_indices, visual_prompts=visual_prompts).eval()
    if return_indices:
        raise PrtoolError("avit halts tokens per image: it has no kept_patch_indices output (use avit-topk)")
    cal = meta.get("thresholds", {}).get(spec.schedule.to_string())
    if cal is None:
        text = spec.schedule.to_string()
        raise PrtoolError(f"{path} has no halting threshold for schedule {text} (it has "
                          f"{sorted(meta.get('thresholds', {}))}): run `prtool tune-avit -s {text}`")
    return AViTVisionTransformer(visual, spec.schedule, halting, cal["threshold"], gather=spec.gather,
                                 normalize=normalize, visual_prompts=visual_prompts).eval()
