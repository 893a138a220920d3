"""Tests written against the mutants of the audit in issue #22 (plausible one-line bugs that the
suite used to let through): multi-stage pruning with visual tokens, kept indices as the top-k in
descending score order, resume computing exactly the missing shards, atomic shard writes, refusal
of a predictor or tokens made for another checkpoint of the same architecture, ToMe's proportional
attention against a hand-computed softmax, and the best (not last) epoch's predictor weights.
The broken-export bench for the validation checks is tests/test_validation_bench.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from prtool.data.datasets import load_dataset
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.models import load_clip
from prtool.encoder.peers import ToMeVisionTransformer, bipartite_merge, block_keys
from prtool.encoder.predictor import PredictorConfig, RankingPredictor, save_predictor
from prtool.encoder.pruned import PrunedVisionTransformer
from prtool.encoder.scorers import ClsAttentionScorer
from prtool.errors import PrtoolError
from prtool.ranking.golden import GoldenRanker, RankConfig
from prtool.ranking.jobs import rank_dataset
from prtool.ranking.predictor_train import PredictorTrainConfig, evaluate_predictor, train_predictor
from prtool.ranking.store import RankingStore, load_store


def _pruned(tiny, schedule="1:16,2:16", prompts: int = 0):
    vp = torch.randn(prompts, 32, generator=torch.Generator().manual_seed(5)) if prompts else None
    return PrunedVisionTransformer(tiny.visual, schedule_for(tiny, schedule), ClsAttentionScorer(),
                                   return_indices=True, visual_prompts=vp).eval()


@pytest.mark.parametrize("prompts", [0, 3])
def test_tokens_per_block_with_visual_tokens(tiny, tiny_pixels, prompts):
    """Every block sees CLS + the visual tokens + k_j patches; later stages keep the first k_j patches
    of the first stage's ranking and never cut into the protected tokens."""
    enc = _pruned(tiny, prompts=prompts)
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for b in enc.transformer.resblocks]
    try:
        with torch.no_grad():
            enc(tiny_pixels[:2])
            x1 = enc.tokens_before(tiny_pixels[:2], 1)
            sel, kept = enc.select(x1, 1)
    finally:
        for h in hooks:
            h.remove()
    p = 1 + prompts
    assert [s.shape[1] for s in seen[:4]] == [p + 64, p + 48, p + 32, p + 32]
    assert torch.allclose(seen[1], sel, atol=1e-6)  # stage 1: protected tokens, then the 48 selected patches
    # stage 2 keeps the protected tokens and the first 32 selected patches: check the tokens entering block 2
    blk1 = enc.transformer.resblocks[1]
    with torch.no_grad():
        after1 = blk1(sel)
    assert torch.allclose(seen[2], after1[:, : p + 32], atol=1e-6)
    assert kept.shape == (2, 48)


@pytest.mark.parametrize("prompts", [0, 3])
def test_kept_indices_are_the_top_k_in_descending_score_order(tiny, tiny_pixels, prompts):
    enc = _pruned(tiny, prompts=prompts)
    with torch.no_grad():
        _, kept = enc(tiny_pixels)
        scores = enc.first_stage_scores(tiny_pixels)
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :32]
    assert torch.equal(kept, want)
    assert (scores.gather(1, kept).diff(dim=1) <= 0).all()


# --- the rankings store: resume computes exactly the missing shards; shards appear atomically ---

@pytest.fixture(scope="module")
def six_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("six")
    for i in range(6):
        arr = (np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
    return load_dataset(str(root), "train")


@pytest.fixture
def count_ranked(monkeypatch):
    calls: list[int] = []
    real = GoldenRanker.rank

    def counting(self, pixels, label=None):
        calls.append(1)
        return real(self, pixels, label)

    monkeypatch.setattr(GoldenRanker, "rank", counting)
    return calls


def _bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_resume_computes_exactly_the_missing_shards(tiny, six_images, tmp_path, count_ranked):
    cfg = RankConfig(1, stride=4)
    first = rank_dataset(tiny, six_images, tmp_path / "s", cfg, shard_size=2, quiet=True)
    assert first["computed_shards"] == 3 and len(count_ranked) == 6
    full = _bytes(tmp_path / "s")
    for name in ("shard-00001.safetensors", "index.json"):  # an interrupted run: one shard and the index missing
        (tmp_path / "s" / name).unlink()
    count_ranked.clear()
    again = rank_dataset(tiny, six_images, tmp_path / "s", cfg, shard_size=2, quiet=True)
    assert again["computed_shards"] == 1 and len(count_ranked) == 2  # the 2 images of the missing shard
    assert _bytes(tmp_path / "s") == full


def test_a_crash_while_writing_a_shard_leaves_no_shard(tiny, six_images, tmp_path, monkeypatch):
    import prtool.ranking.shards as shards

    real = shards.os.replace

    def dies_before_the_rename(src, dst):  # a shard's data is in its temporary file when the process dies
        if not Path(dst).name.startswith("shard-"):
            return real(src, dst)
        Path(src).write_bytes(Path(src).read_bytes()[:40])  # a torn write ...
        raise OSError("disk full")  # ... and no rename

    monkeypatch.setattr(shards.os, "replace", dies_before_the_rename)
    with pytest.raises(OSError, match="disk full"):
        rank_dataset(tiny, six_images, tmp_path / "s", RankConfig(1, stride=4), shard_size=2, quiet=True)
    assert not list((tmp_path / "s").glob("shard-*.safetensors"))  # resume will recompute it, not trust it
    monkeypatch.setattr(shards.os, "replace", real)
    rank_dataset(tiny, six_images, tmp_path / "s", RankConfig(1, stride=4), shard_size=2, quiet=True)
    assert len(load_store(tmp_path / "s").ids) == 6


# --- another checkpoint of the same architecture is refused ---

@pytest.fixture(scope="module")
def two_checkpoints(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    state = tiny.model.state_dict()
    paths = []
    for i, shift in enumerate((0.0, 1e-3)):
        path = root / f"ckpt{i}.safetensors"
        save_file({k: (v + shift).contiguous() for k, v in state.items()}, str(path))
        paths.append(path)
    return [load_clip("prtool-tiny", str(p)) for p in paths]


def test_predictor_for_another_checkpoint_of_the_same_architecture_is_refused(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    assert a.model_id["model"] == b.model_id["model"] and a.checkpoint_sha256 != b.checkpoint_sha256
    pred = tmp_path / "pred.safetensors"
    save_predictor(RankingPredictor(PredictorConfig(64, 32)), pred, {"model_id": a.model_id, "rank_block": 1})
    spec = EncoderSpec(schedule_for(a, "1:16"), "predictor", pred)
    build_pruned_encoder(a, spec)  # its own checkpoint: accepted
    with pytest.raises(PrtoolError, match="was made for .*sha256"):
        build_pruned_encoder(b, spec)


def test_tokens_for_another_checkpoint_of_the_same_architecture_are_refused(two_checkpoints, tmp_path):
    from prtool.tuning.prompts import PromptLearner, load_tokens, save_tokens

    a, b = two_checkpoints
    learner = PromptLearner(a.model, a.tokenizer(), 2, "both", init=None, vision_width=32)
    tokens = tmp_path / "tok.safetensors"
    save_tokens(learner, tokens, {"model_id": a.model_id, "schedule": "1:16", "scorer": "cls-attn", "n_ctx": 2,
                                  "mode": "both"})
    load_tokens(tokens, a.model, a.tokenizer(), 32, a.model_id, "1:16")  # its own checkpoint: accepted
    with pytest.raises(PrtoolError, match="was made for .*sha256"):
        load_tokens(tokens, b.model, b.tokenizer(), 32, b.model_id, "1:16")


# --- ToMe: proportional attention and size bookkeeping, computed by hand ---

def _block_by_hand(blk, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """open_clip's residual block with attention logits ``q.k / sqrt(d) + log(size_key)`` written out."""
    attn = blk.attn
    b, t, d = x.shape
    h = attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // h) + size.log()[:, None, None, :]
    mixed = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
    x = x + blk.ls_1(attn.out_proj(mixed))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def test_tome_uses_proportional_attention_after_merging(tiny, tiny_pixels):
    enc = ToMeVisionTransformer(tiny.visual, schedule_for(tiny, "1:16,2:16")).eval()
    x = tiny_pixels[:3]
    with torch.no_grad():
        got, got_size = enc.forward_with_sizes(x)
        h = enc.embed(x)
        size = torch.ones(h.shape[:2])
        n = 64
        for i, blk in enumerate(enc.transformer.resblocks):
            if i in (1, 2):
                h, size = bipartite_merge(h, size, block_keys(h, blk), 16, 1, n)
                n -= 16
            h = _block_by_hand(blk, h, size)
        want = enc.pool(h)
    assert torch.equal(got_size, size)
    assert torch.allclose(got, want, atol=1e-5)
    # merges happened, so +log(size) is not a no-op here
    assert (size > 1).any()


def test_merge_sizes_count_the_patches_each_token_holds():
    """Merge one-hot tokens twice: each token times its size must be the 0/1 set of patches it holds,
    every patch in exactly one token (sizes sum to N + 1), CLS untouched."""
    g = torch.Generator().manual_seed(0)
    n = 64
    x = torch.eye(1 + n).unsqueeze(0).repeat(2, 1, 1)
    size = torch.ones(2, 1 + n)
    for r in (16, 16):
        x, size = bipartite_merge(x, size, torch.randn(2, x.shape[1], 8, generator=g), r, 1, n)
        n -= r
    members = x * size.unsqueeze(-1)
    assert size.shape == (2, 33) and (size > 1).any()
    assert torch.allclose(members, members.round(), atol=1e-5)
    assert torch.allclose(members.sum(1), torch.ones(2, 65), atol=1e-5)  # every patch counted once
    assert torch.allclose(members.sum(2), size, atol=1e-5)  # a token's size = the patches it holds
    assert torch.equal(x[:, 0], torch.eye(65)[0].expand(2, -1)) and (size[:, 0] == 1).all()


# --- predictor training keeps the best epoch, which here is not the last ---

def test_best_epoch_weights_are_restored_when_the_best_is_not_the_last():
    """Train and validation targets disagree (val wants the first feature, train its negation), so
    training makes validation worse: the best epoch is early, and its weights must be returned."""
    g = torch.Generator().manual_seed(0)
    m, n, d = 40, 16, 8
    tokens = torch.randn(m, n, d, generator=g)
    from prtool.ranking.predictor_train import split_rows

    cfg = PredictorTrainConfig(epochs=6, batch_size=8, lr=3e-3, val_fraction=0.25, seed=0)
    _, val_rows = split_rows(m, cfg.val_fraction, cfg.seed)
    sign = -torch.ones(m, 1)
    sign[torch.from_numpy(val_rows)] = 1.0
    importance = (tokens[..., 0] * sign).numpy().astype(np.float32)
    store = RankingStore({}, [str(i) for i in range(m)], np.argsort(-importance, axis=1, kind="stable"), importance)
    predictor, metrics = train_predictor(tokens, store, cfg, k_final=8, quiet=True)
    history = metrics["history"]
    best = metrics["best_epoch"]
    assert best != cfg.epochs, [h["match@8"] for h in history]
    again = evaluate_predictor(predictor, tokens, torch.from_numpy(importance), torch.from_numpy(store.rankings),
                               val_rows, [8, 16], cfg.tau)
    assert again["val_loss"] == pytest.approx(history[best - 1]["val_loss"], abs=1e-6)
    assert again["val_loss"] != pytest.approx(history[-1]["val_loss"], abs=1e-6)
