import pytest
import torch

from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.peers import EViTVisionTransformer, ToMeVisionTransformer, bipartite_merge
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
