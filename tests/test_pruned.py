import pytest
import torch

from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.predictor import PredictorConfig, RankingPredictor
from prtool.encoder.pruned import PrunedVisionTransformer, check_supported_tower, gather_tokens
from prtool.encoder.scorers import ClsAttentionScorer, PredictorScorer, RandomScorer, cls_attention
from prtool.errors import PrtoolError


def test_empty_schedule_reproduces_unpruned(tiny, tiny_pixels):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "none")), normalize=False)
    with torch.no_grad():
        ref = tiny.visual(tiny_pixels)
        got = enc(tiny_pixels)
    assert (got - ref).abs().max().item() <= 1e-5


def test_state_dict_keys_are_the_towers(tiny):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "cls-attn"))
    assert set(enc.state_dict()) == set(tiny.visual.state_dict())
    enc_p, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "predictor"))
    extra = set(enc_p.state_dict()) - set(tiny.visual.state_dict())
    assert extra and all(k.startswith("scorer.predictor.") for k in extra)


@pytest.mark.parametrize("scorer", ["predictor", "cls-attn", "random"])
def test_every_scorer_prunes(tiny, tiny_pixels, scorer):
    sched = schedule_for(tiny, "1:16,2:16")
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(sched, scorer), return_indices=True)
    with torch.no_grad():
        emb, kept = enc(tiny_pixels)
    assert emb.shape == (7, 24) and kept.shape == (7, 32) and kept.dtype == torch.int64
    assert torch.allclose(emb.norm(dim=-1), torch.ones(7), atol=1e-5)
    for row in kept:
        assert len(set(row.tolist())) == 32 and 0 <= row.min() and row.max() < 64


def test_later_stages_keep_a_prefix_equal_to_reranking(tiny, tiny_pixels):
    """Stage 2 keeps the first k2 of the stage-1 TopK: the same set as TopK(k2) over the same scores."""
    sched = schedule_for(tiny, "1:16,2:16")
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(sched, "cls-attn"), return_indices=True)
    with torch.no_grad():
        _, kept = enc(tiny_pixels)
        x = enc.tokens_before(tiny_pixels, 1)
        scores = cls_attention(x, enc.transformer.resblocks[1], 1)
        top32 = torch.topk(scores, 32, dim=1).indices
    for a, b in zip(kept, top32):
        assert set(a.tolist()) == set(b.tolist())


def test_gather_modes_agree():
    x = torch.randn(3, 10, 4)
    idx = torch.stack([torch.randperm(10)[:6] for _ in range(3)])
    ref = torch.stack([x[b, idx[b]] for b in range(3)])
    for mode in ("flat", "elements", "nd"):
        assert torch.equal(gather_tokens(x, idx, mode), ref)
    with pytest.raises(PrtoolError, match="gather mode"):
        gather_tokens(x, idx, "scatter")


def test_protected_tokens_stay_in_front_and_never_reach_the_predictor(tiny, tiny_pixels):
    seen = {}

    class Spy(RankingPredictor):
        def forward(self, patches):
            seen["shape"] = tuple(patches.shape)
            return super().forward(patches)

    prompts = torch.randn(3, 32)
    sched = schedule_for(tiny, "1:60")
    enc = PrunedVisionTransformer(tiny.visual, sched, PredictorScorer(Spy(PredictorConfig(64, 32))),
                                  visual_prompts=prompts).eval()
    assert enc.num_prefix == 4
    with torch.no_grad():
        x = enc.embed(tiny_pixels[:2])
        assert torch.allclose(x[:, 1:4], enc.ln_pre(prompts).expand(2, -1, -1), atol=1e-6)
        enc(tiny_pixels[:2])
    assert seen["shape"] == (2, 64, 32)  # patches only: no CLS, no prompt tokens


def test_cls_attention_is_a_distribution(tiny, tiny_pixels):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "none")))
    with torch.no_grad():
        x = enc.tokens_before(tiny_pixels, 1)
        a = cls_attention(x, enc.transformer.resblocks[1], 0)
    assert a.shape == (7, 65) and torch.allclose(a.sum(1), torch.ones(7), atol=1e-5)


def test_random_scorer_is_seeded(tiny, tiny_pixels):
    x = torch.zeros(2, 65, 32)
    assert torch.equal(RandomScorer(3)(x, 1, None), RandomScorer(3)(x, 1, None))


def test_schedule_must_match_model(tiny):
    from prtool.encoder.schedule import parse_schedule

    with pytest.raises(PrtoolError, match="schedule made for"):
        PrunedVisionTransformer(tiny.visual, parse_schedule("3:20", 196, 12), ClsAttentionScorer())
    with pytest.raises(PrtoolError, match="needs a scorer"):
        PrunedVisionTransformer(tiny.visual, parse_schedule("1:20", 64, 4), None)


def test_open_clip_tower_structure_is_what_prtool_relies_on(tiny):
    """Fails loudly when an open_clip release moves the VisionTransformer internals prtool wraps."""
    v = tiny.visual
    check_supported_tower(v)
    assert isinstance(v.conv1, torch.nn.Conv2d)
    assert v.positional_embedding.shape == (65, 32) and v.class_embedding.shape == (32,)
    assert v.transformer.batch_first and len(v.transformer.resblocks) == 4
    blk = v.transformer.resblocks[0]
    assert {"ln_1", "attn", "ln_2", "mlp"} <= set(dict(blk.named_children()))
    assert v.pool_type == "tok" and v.attn_pool is None and v.proj.shape == (32, 24)
