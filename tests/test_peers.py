import copy

import pytest
import torch

from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.merge import expanded_mask
from prtool.encoder.peers import EViTVisionTransformer, ToMeVisionTransformer, bipartite_merge, block_keys
from prtool.encoder.pruned import gather_tokens
from prtool.encoder.scorers import cls_attention
from prtool.errors import PrtoolError


@pytest.mark.parametrize("cls", [EViTVisionTransformer, ToMeVisionTransformer])
def test_peers_with_nothing_removed_equal_unpruned(tiny, tiny_pixels, cls):
    enc = cls(tiny.visual, schedule_for(tiny, "none")).eval()
    with torch.no_grad():
        assert (enc(tiny_pixels) - tiny.visual(tiny_pixels)).abs().max() <= 1e-5


def test_tome_sizes_are_consistent(tiny, tiny_pixels):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), "tome"))
    with torch.no_grad():
        emb, size = enc.forward_with_sizes(tiny_pixels)
    assert size.shape == (7, 1 + 32)  # CLS + the 32 tokens left after two merges of 16
    assert torch.allclose(size.sum(1), torch.full((7,), 65.0))  # sizes sum to N + 1
    assert (size[:, 0] == 1).all()  # CLS is protected: never merged


def test_bipartite_merge_is_a_size_weighted_average():
    x = torch.tensor([[[0.0], [10.0], [1.0], [11.0], [5.0]]])  # CLS, then A=(10, 11), B=(1, 5) ...
    size = torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0]])
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0]]])
    out, s = bipartite_merge(x, size, metric, r=1, protected=1, n=4)
    # A = tokens 1, 3 (values 10, 11); B = tokens 2, 4 (values 1, 5). Token 3 (11, size 3) merges into token 4.
    assert s.tolist() == [[1.0, 1.0, 2.0, 4.0]] and torch.isclose(s.sum(), size.sum())
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 10.0, 1.0, (11 * 3 + 5 * 1) / 4]))
    with pytest.raises(PrtoolError, match="at most 2 of 4"):
        bipartite_merge(x, size, metric, r=3, protected=1, n=4)


def test_evit_fused_token_is_the_attention_weighted_mean(tiny, tiny_pixels):
    enc = EViTVisionTransformer(tiny.visual, schedule_for(tiny, "1:16")).eval()
    blk = enc.transformer.resblocks[1]
    with torch.no_grad():
        x = enc.tokens_before(tiny_pixels, 1)
        out = enc.reduce(x, blk, 64, 48)
        attn = cls_attention(x, blk, 1)
    assert out.shape == (7, 1 + 48, 32)
    order = torch.argsort(attn, dim=1, descending=True)
    for b in range(7):
        kept, dropped = order[b, :47], order[b, 47:]
        assert torch.allclose(out[b, 1:48], x[b, 1 + kept], atol=1e-6)
        w = attn[b, dropped]
        fused = (x[b, 1 + dropped] * w[:, None]).sum(0) / w.sum()
        assert torch.allclose(out[b, 48], fused, atol=1e-5)


@pytest.mark.parametrize("method", ["evit", "tome"])
def test_peers_export_and_validate(tiny, tmp_path, method):
    from prtool.export.onnx_export import ExportOptions, export_onnx

    res = export_onnx(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), method), tmp_path / "m.onnx", ExportOptions())
    assert res.report.passed, res.report.failure_summary()
    with pytest.raises(PrtoolError, match="no kept_patch_indices"):
        export_onnx(tiny, EncoderSpec(schedule_for(tiny, "1:16"), method), tmp_path / "k.onnx",
                    ExportOptions(with_kept_indices=True))


def _with_key_bias(blk):
    """A copy of ``blk`` with a non-zero in_proj bias (random init leaves it zero, hiding the key bias)."""
    blk = copy.deepcopy(blk)
    with torch.no_grad():
        bias = blk.attn.in_proj_bias
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(3)))
    return blk


def test_block_keys_are_the_keys_the_block_attends_with(tiny):
    blk = _with_key_bias(tiny.visual.transformer.resblocks[1])
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    attn = blk.attn
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3)
    with torch.no_grad():
        h = blk.ln_1(x)
        keys = block_keys(x, blk)
        assert torch.allclose(keys, h @ w_k.T + b_k, atol=1e-6)  # the middle third of in_proj, bias included
        # and they are the keys of the block's own attention: its probabilities are softmax(q k^T / sqrt(hd))
        hb = h if attn.batch_first else h.transpose(0, 1)
        _, probs = attn(hb, hb, hb, need_weights=True, average_attn_weights=False)
        heads, hd = attn.num_heads, attn.head_dim
        q = (h @ w_q.T + b_q).view(2, 5, heads, hd).transpose(1, 2)
        k = keys.view(2, 5, heads, hd).transpose(1, 2)
    assert torch.allclose(probs, torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1), atol=1e-6)
    # a block whose attention has no bias at all (in_proj_bias None): the keys are the bare projection
    attn.in_proj_bias = None
    with torch.no_grad():
        assert torch.allclose(block_keys(x, blk), h @ w_k.T, atol=1e-6)


def test_bipartite_merge_may_merge_every_a_token_and_no_more():
    x = torch.tensor([[[0.0], [10.0], [1.0], [11.0], [5.0]]])  # CLS, A=(10, 11), B=(1, 5) as above
    size = torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0]])
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0]]])
    out, s = bipartite_merge(x, size, metric, r=2, protected=1, n=4)  # r = |A|: both A tokens merge
    # token 1 (10, size 1) -> token 2 (1, size 2); token 3 (11, size 3) -> token 4 (5, size 1); CLS kept
    assert s.tolist() == [[1.0, 3.0, 4.0]]
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, (10 + 1 * 2) / 3, (11 * 3 + 5) / 4]))
    # n odd: A (even positions) has (n + 1) // 2 tokens, all of which may merge
    x5, s5 = torch.arange(6.0).view(1, 6, 1), torch.ones(1, 6)
    m5 = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0))
    out5, size5 = bipartite_merge(x5, s5, m5, r=3, protected=1, n=5)
    assert out5.shape == (1, 3, 1) and size5[0, 0] == 1 and size5.sum() == 6 and out5[0, 0, 0] == 0
    assert torch.isclose((out5[0, :, 0] * size5[0]).sum(), torch.tensor(15.0))  # 0 + 1 + ... + 5: no mass lost
    with pytest.raises(PrtoolError, match="at most 3 of 5"):
        bipartite_merge(x5, s5, m5, r=4, protected=1, n=5)


@pytest.mark.parametrize("r, merged_b, unmerged_a", [(1, [2.0, 3.5, 6.0, 8.0], [1.0, 5.0, 7.0]),
                                                     (2, [2.0, 3.5, 5.5, 8.0], [1.0, 7.0]),
                                                     (3, [2.0, 3.5, 5.5, 7.5], [1.0])])
def test_bipartite_merge_merges_the_r_most_similar_edges(r, merged_b, unmerged_a):
    """Tokens 1..8 hold their own index; A = 1, 3, 5, 7 at 40, 95, 200, 300 degrees, B = 2, 4, 6, 8 at 0, 90,
    180, 270. Each A's edge goes to the nearest B (1->2, 3->4, 5->6, 7->8) with cosines 0.77, 1.00, 0.94, 0.87:
    the r strongest edges (3->4, then 5->6, then 7->8) merge; the rest of A stays (in any order), B in place."""
    angles = torch.tensor([45.0, 40, 0, 95, 90, 200, 180, 300, 270]).deg2rad()  # CLS first
    metric = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    x, size = torch.arange(9.0).view(1, 9, 1), torch.ones(1, 9)
    out, s = bipartite_merge(x, size, metric, r=r, protected=1, n=8)
    na = 4 - r
    assert out[0, 0, 0] == 0 and s[0, 0] == 1
    assert sorted(out[0, 1 : 1 + na, 0].tolist()) == unmerged_a and (s[0, 1 : 1 + na] == 1).all()
    assert torch.allclose(out[0, 1 + na :, 0], torch.tensor(merged_b))
    assert s[0, 1 + na :].tolist() == [1.0 + (b % 1 != 0) for b in merged_b]  # a merged pair holds 2 patches


def test_tome_attention_mask_only_after_the_first_merge_and_sizes_in_the_tokens_dtype(tiny, tiny_pixels, monkeypatch):
    from prtool.encoder import peers

    masks = []
    monkeypatch.setattr(peers, "expanded_mask", lambda size, heads: masks.append(size) or expanded_mask(size, heads))
    enc = ToMeVisionTransformer(tiny.visual, schedule_for(tiny, "2:16,3:16")).eval()
    with torch.no_grad():
        emb, size = enc.forward_with_sizes(tiny_pixels[:2])
    # blocks 0 and 1 run before any merge: no mask (all sizes 1 would make it a no-op costing [B*H, T, T])
    assert [m.shape[1] for m in masks] == [1 + 48, 1 + 32]
    double = ToMeVisionTransformer(copy.deepcopy(tiny.visual).double(), schedule_for(tiny, "2:16,3:16")).eval()
    with torch.no_grad():
        emb64, size64 = double.forward_with_sizes(tiny_pixels[:2].double())
    assert size64.dtype == torch.float64 and torch.equal(size64, size.double())
    assert torch.allclose(emb64.float(), emb, atol=1e-4)
    # the sizes live on the tokens' device ("meta": shapes only, no data; CUDA in production)
    meta = ToMeVisionTransformer(copy.deepcopy(tiny.visual), schedule_for(tiny, "2:16,3:16")).eval().to("meta")
    emb_meta, size_meta = meta.forward_with_sizes(torch.empty(2, 3, 64, 64, device="meta"))
    assert size_meta.device.type == "meta" and size_meta.shape == (2, 1 + 32) and emb_meta.shape == emb.shape


def test_evit_gathers_with_the_encoders_gather_mode(tiny, tiny_pixels, monkeypatch):
    from prtool.encoder import peers

    modes = []

    def spy(x, idx, mode="flat"):
        modes.append(mode)
        return gather_tokens(x, idx, mode)

    monkeypatch.setattr(peers, "gather_tokens", spy)
    enc = EViTVisionTransformer(tiny.visual, schedule_for(tiny, "1:16"), gather="nd").eval()
    ref = EViTVisionTransformer(tiny.visual, schedule_for(tiny, "1:16")).eval()
    with torch.no_grad():
        out = enc(tiny_pixels[:2])
        assert modes == ["nd", "nd"]  # kept and dropped
        assert torch.allclose(out, ref(tiny_pixels[:2]), atol=1e-6)
