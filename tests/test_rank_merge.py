import copy
import json

import numpy as np
import onnx
import pytest
import torch

from prtool.encoder import rank_merge
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.merge import expanded_mask, fuse, merge_into, most_similar, proportional_attention
from prtool.encoder.rank_merge import RankMergeVisionTransformer, attention_block
from prtool.encoder.scorers import ClsAttentionScorer
from prtool.errors import PrtoolError
from prtool.export.onnx_graph import op_histogram, topk_nodes, trt_readiness


def test_nothing_removed_equals_unpruned(tiny, tiny_pixels):
    enc = RankMergeVisionTransformer(tiny.visual, schedule_for(tiny, "none")).eval()
    with torch.no_grad():
        assert (enc(tiny_pixels) - tiny.visual(tiny_pixels)).abs().max() <= 1e-5


@pytest.mark.parametrize("design", [{}, {"target": "tokens"}, {"target": "keys"},
                                    {"target": "tokens", "merge_op": "scatter"}])
def test_sizes_sum_to_n_plus_one_and_prefix_never_merges(tiny, tiny_pixels, design):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn-merge", merge=design))
    with torch.no_grad():
        _, order, size = enc.forward_with_sizes(tiny_pixels)
    assert size.shape == (7, 1 + 32)
    assert torch.allclose(size.sum(1), torch.full((7,), 65.0))  # sizes sum to N + 1
    assert (size[:, 0] == 1).all()  # CLS is protected: never merged into, never merged
    assert (size[:, 1:] >= 1).all()
    assert sorted(order[0].tolist()) == list(range(64))  # one full ranking: kept and dropped from one TopK


def test_merge_hand_checked_on_a_tiny_tensor():
    kept = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # kept A (size 1), B (size 3)
    kept_size = torch.tensor([[1.0, 3.0]])
    dropped = torch.tensor([[[3.0, 0.1], [0.0, 6.0], [5.0, 0.0]]])  # like A, like B, like A
    dropped_size = torch.tensor([[2.0, 1.0, 1.0]])
    target = most_similar(dropped, kept)
    assert target.tolist() == [[0, 1, 0]]
    for op in ("onehot", "scatter"):
        out, size = merge_into(kept, kept_size, dropped, dropped_size, target, op)
        # A: (1*[1,0] + 2*[3,0.1] + 1*[5,0]) / 4 = [3, 0.05]; B: (3*[0,2] + 1*[0,6]) / 4 = [0, 3]
        assert size.tolist() == [[4.0, 4.0]]
        assert torch.allclose(out, torch.tensor([[[3.0, 0.05], [0.0, 3.0]]]))
    fused, fused_size = fuse(dropped, dropped_size)
    assert fused_size.tolist() == [[4.0]] and torch.allclose(fused, torch.tensor([[[11 / 4, 6.2 / 4]]]))


def test_proportional_attention_equals_expanded_mask_reference(tiny):
    torch.manual_seed(0)
    blk = copy.deepcopy(tiny.visual.transformer.resblocks[1])
    with torch.no_grad():  # a non-zero in_proj bias (random init leaves it zero): q, k and v carry their biases
        blk.attn.in_proj_bias.normal_()
    x = torch.randn(3, 9, 32)
    size = torch.randint(1, 6, (3, 9)).float()
    with torch.no_grad():
        ref = blk(x, attn_mask=expanded_mask(size, blk.attn.num_heads))
        log_size = size.log()[:, None, None, :]
        for sdpa in (False, True):
            assert (attention_block(blk, x, log_size, sdpa=sdpa) - ref).abs().max() <= 1e-6
        q, k, v = torch.randn(3, 3, 4, 9, 8).unbind(0)
        logits = q @ k.transpose(-1, -2) / 8 ** 0.5 + expanded_mask(size, 4).view(3, 4, 9, 9)
        assert (proportional_attention(q, k, v, log_size) - torch.softmax(logits, -1) @ v).abs().max() <= 1e-6


def test_sizes_change_the_output_only_through_proportional_attention(tiny, tiny_pixels):
    spec = EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn-merge")
    with_pa, _ = build_pruned_encoder(tiny, spec)
    mask, _ = build_pruned_encoder(tiny, EncoderSpec(spec.schedule, spec.scorer, merge={"attention": "mask"}))
    without, _ = build_pruned_encoder(tiny, EncoderSpec(spec.schedule, spec.scorer, merge={"attention": "none"}))
    with torch.no_grad():
        a, b, c = with_pa(tiny_pixels), mask(tiny_pixels), without(tiny_pixels)
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() > 1e-3


def test_unknown_design_is_refused(tiny):
    with pytest.raises(PrtoolError, match="unknown merge target"):
        build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "cls-attn-merge", merge={"target": "x"}))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_validates_with_both_exporters(tiny, tmp_path, exporter):
    from prtool.export.onnx_export import ExportOptions, export_onnx

    spec = EncoderSpec(schedule_for(tiny, "1:16,2:16"), "patch-ranking-merge")
    res = export_onnx(tiny, spec, tmp_path / "m.onnx", ExportOptions(exporter=exporter, with_kept_indices=True))
    assert res.report.passed, res.report.failure_summary()
    model = onnx.load(str(res.onnx_path))
    tk = topk_nodes(model)
    assert len(tk) == 1 and tk[0]["constant_k"] and tk[0]["k"] == 64 and tk[0]["sorted"]  # K = N: one ranking
    ops = op_histogram(model)
    assert "ScatterElements" not in ops and "ScatterND" not in ops  # the merge is a one-hot matmul
    assert trt_readiness(model)["ready"]
    for label in ("batch 1", "batch 7"):
        assert res.report.metrics[f"image_embeds @ {label}"]["max_abs"] <= 1e-4
    assert res.report.metrics["batch_independence_max_abs"] <= 1e-4
    assert json.loads(res.manifest_path.read_text())["scorer"] == "patch-ranking-merge"


def test_reference_evaluator_runs_the_merge_export(tiny, tmp_path, tiny_pixels):
    from onnx.reference import ReferenceEvaluator

    from prtool.export.onnx_export import ExportOptions, export_onnx

    spec = EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn-merge")
    res = export_onnx(tiny, spec, tmp_path / "m.onnx", ExportOptions(validate=False))
    (emb,) = ReferenceEvaluator(str(res.onnx_path)).run(None, {"pixel_values": tiny_pixels[:2].numpy()})
    enc, _ = build_pruned_encoder(tiny, spec)
    with torch.no_grad():
        assert np.abs(emb - enc(tiny_pixels[:2]).numpy()).max() <= 1e-4


def test_prtool_validate_rebuilds_a_merge_export_from_its_manifest(tiny, tmp_path):
    from safetensors.torch import save_file

    from prtool.deploy.verify import validate_artifact
    from prtool.encoder.models import load_clip
    from prtool.encoder.predictor import PredictorConfig, RankingPredictor, save_predictor
    from prtool.export.onnx_export import ExportOptions, export_onnx

    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tiny.model.state_dict().items()}, str(ckpt))
    loaded = load_clip("prtool-tiny", str(ckpt))
    torch.manual_seed(5)
    pred = tmp_path / "pred.safetensors"
    save_predictor(RankingPredictor(PredictorConfig(64, 32)), pred, {"model_id": loaded.model_id, "rank_block": 1})
    spec = EncoderSpec(schedule_for(loaded, "1:16,2:16"), "patch-ranking-merge", pred, merge={"target": "tokens"})
    res = export_onnx(loaded, spec, tmp_path / "m.onnx", ExportOptions(validate=False))
    assert json.loads(res.manifest_path.read_text())["merge"] == {"target": "tokens"}
    out = validate_artifact(res.onnx_path, pretrained=str(ckpt))
    assert out["passed"], out["validation"]["checks"]


def _merged_by_hand(x, size, metric, keep):
    """Each dropped patch token (after CLS, past ``keep``) into its most cosine-similar kept one, size-weighted."""
    out, out_size = x[:, : 1 + keep].clone(), size[:, : 1 + keep].clone()
    targets = []
    for b in range(x.shape[0]):
        acc = [x[b, 1 + i] * size[b, 1 + i] for i in range(keep)]
        for j in range(1 + keep, x.shape[1]):
            cos = [float(metric[b, j - 1] @ metric[b, i] / (metric[b, j - 1].norm() * metric[b, i].norm()))
                   for i in range(keep)]
            i = cos.index(max(cos))
            targets.append(i)
            acc[i] = acc[i] + x[b, j] * size[b, j]
            out_size[b, 1 + i] += size[b, j]
        for i in range(keep):
            out[b, 1 + i] = acc[i] / out_size[b, 1 + i]
    return out, out_size, targets


@pytest.mark.parametrize("merge_op", ["onehot", "scatter"])
def test_reduce_merges_each_dropped_token_into_its_most_similar_kept_one(tiny, merge_op, monkeypatch):
    ops = []
    monkeypatch.setattr(rank_merge, "merge_into", lambda *a: ops.append(a[5:]) or merge_into(*a))
    blk = copy.deepcopy(tiny.visual.transformer.resblocks[1])
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        blk.attn.in_proj_bias.copy_(torch.randn(blk.attn.in_proj_bias.shape, generator=g))
        x = torch.randn(2, 1 + 10, 32, generator=g)
        size = torch.randint(1, 5, (2, 11), generator=g).float()
        w_k, b_k = blk.attn.in_proj_weight.chunk(3)[1], blk.attn.in_proj_bias.chunk(3)[1]
        metrics = {"tokens": x[:, 1:], "keys": blk.ln_1(x[:, 1:]) @ w_k.T + b_k}
        targets = {}
        for target, metric in metrics.items():
            enc = RankMergeVisionTransformer(tiny.visual, schedule_for(tiny, "1:16"), ClsAttentionScorer(),
                                             target=target, merge_op=merge_op)
            out, out_size = enc.reduce(x, size, 6, blk)
            want, want_size, targets[target] = _merged_by_hand(x, size, metric, 6)
            assert torch.allclose(out_size, want_size) and torch.allclose(out, want, atol=1e-5), target
        assert targets["tokens"] != targets["keys"]  # the two metrics pick different targets here
        assert ops == [(merge_op,), (merge_op,)]  # the design's op (same values, another graph: onehot or scatter)
        enc = RankMergeVisionTransformer(tiny.visual, schedule_for(tiny, "1:16"), ClsAttentionScorer(), target="fused")
        out, out_size = enc.reduce(x, size, 6, blk)
    # fused: CLS and the first 5 patches as they are, the other 5 as one size-weighted token at the end
    fused = (x[:, 6:] * size[:, 6:, None]).sum(1) / size[:, 6:].sum(1, keepdim=True)
    assert torch.equal(out[:, :6], x[:, :6]) and torch.equal(out_size[:, :6], size[:, :6])
    assert torch.allclose(out[:, 6], fused, atol=1e-6) and torch.allclose(out_size[:, 6], size[:, 6:].sum(1))


def test_each_attention_design_runs_its_own_attention(tiny, tiny_pixels, monkeypatch):
    """explicit: the block's weights through proportional_attention; sdpa: torch's SDPA with the log-size bias;
    mask: open_clip's block with the [B * heads, T, T] mask; none: the plain block. Only the stage blocks
    (1, 2, 3 of the tiny model's 4) carry sizes; block 0 runs the plain block in every design."""
    calls = {"explicit": 0, "mha": 0}

    def spy(*args, **kw):
        calls["explicit"] += 1
        return proportional_attention(*args, **kw)

    monkeypatch.setattr(rank_merge, "proportional_attention", spy)
    counted = []
    for design, explicit, mha in (("explicit", 3, 1), ("sdpa", 0, 1), ("mask", 0, 4), ("none", 0, 4)):
        enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn-merge",
                                                         merge={"attention": design}))
        hooks = [b.attn.register_forward_hook(lambda *a: calls.__setitem__("mha", calls["mha"] + 1))
                 for b in enc.transformer.resblocks]
        calls.update(explicit=0, mha=0)
        with torch.no_grad():
            enc(tiny_pixels[:2])
        for h in hooks:
            h.remove()
        counted.append((design, calls["explicit"], calls["mha"]))
        assert counted[-1] == (design, explicit, mha)
    calls["explicit"] = 0
    blk = tiny.visual.transformer.resblocks[1]
    with torch.no_grad():
        attention_block(blk, torch.randn(1, 5, 32), torch.zeros(1, 1, 1, 5))  # sdpa defaults to False
    assert calls["explicit"] == 1


def test_most_similar_is_by_cosine_and_ties_go_to_the_lowest_index():
    kept = torch.tensor([[[4.0, 2.0, 2.0], [2.0, 4.0, 4.0]]])  # A, B
    # [4, 3, 3]: the dot product prefers B (32 > 28), the cosine A (28 / sqrt(24) = 5.72 > 32 / 6 = 5.33)
    assert most_similar(torch.tensor([[[4.0, 3.0, 3.0]]]), kept).tolist() == [[0]]
    # [1, 1, 1]: A 8 / sqrt(24) = 1.63 < B 10 / 6 = 1.67; both answers in one batch, rows independent
    both = most_similar(torch.tensor([[[4.0, 3.0, 3.0], [1.0, 1.0, 1.0]]]).repeat(2, 1, 1), kept.repeat(2, 1, 1))
    assert both.tolist() == [[0, 1], [0, 1]]
    # an exact tie (same direction, other length) goes to the first kept token
    tie = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    assert most_similar(torch.tensor([[[1.0, 2.0, 0.0]]]), tie).tolist() == [[0]]


def test_merge_into_defaults_to_the_onehot_matmul_and_keeps_the_tokens_device():
    kept, kept_size = torch.tensor([[[2.0], [4.0]]]), torch.tensor([[1.0, 3.0]])
    dropped, dropped_size, target = torch.tensor([[[8.0]]]), torch.tensor([[2.0]]), torch.tensor([[1]])
    out, size = merge_into(kept, kept_size, dropped, dropped_size, target)  # no op given
    assert size.tolist() == [[1.0, 5.0]] and torch.allclose(out.flatten(), torch.tensor([2.0, (4 * 3 + 8 * 2) / 5]))
    with pytest.raises(ValueError, match="unknown merge op 'sum'"):
        merge_into(kept, kept_size, dropped, dropped_size, target, "sum")
    # every intermediate on the inputs' device (here "meta": shapes only; CUDA in production)
    meta = [t.to("meta") for t in (kept, kept_size, dropped, dropped_size, target)]
    for op in ("onehot", "scatter"):
        out, size = merge_into(*meta, op=op)
        assert out.device.type == "meta" and out.shape == (1, 2, 1) and size.shape == (1, 2)
