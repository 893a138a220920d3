"""A-ViT (prtool.encoder.avit, prtool.tuning.avit_train): halting bookkeeping, equal-token-count matching,
fixed-k export."""

import pytest
import torch
from conftest import cli

from prtool.encoder.avit import (
    HALTED_LOGIT,
    AViTTopKVisionTransformer,
    AViTVisionTransformer,
    HaltingHead,
    halting_losses,
    prior_mean_for,
    tuned_state,
)
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.errors import PrtoolError


def _masked(tiny, gamma, beta, threshold=0.99):
    return AViTVisionTransformer(tiny.visual, schedule_for(tiny, "none"), HaltingHead(gamma, beta), threshold).eval()


def test_constant_halting_scores_accumulate_and_ponder(tiny, tiny_pixels):
    # h = 0.4 after every block: cumulative 0.4, 0.8, 1.2 -> every token halts after block 2 (ran 3 blocks),
    # its remainder is 1 - 0.8, so rho = 3 + 0.2; block 3 sees no patch token.
    beta = float(torch.logit(torch.tensor(0.4)))
    with torch.no_grad():
        _, info = _masked(tiny, 0.0, beta).forward_halting(tiny_pixels)
    assert info["active"].tolist() == [[64, 64, 64, 0]] * 7
    assert torch.allclose(info["cumulative"], torch.full((7, 64), 1.2), atol=1e-5)
    assert torch.allclose(info["rho"], torch.full((7, 64), 3.2), atol=1e-5)
    ponder, kl = halting_losses(info, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert ponder.item() == pytest.approx(3.2, abs=1e-5) and kl.item() > 0


def _reference(tiny, pixels, halting, threshold):
    """Halting written with open_clip's own blocks and a float attention mask (an independent path)."""
    enc = _masked(tiny, 0.0, 0.0)
    x = enc.embed(pixels)
    blocks = enc.transformer.resblocks
    active = torch.ones(x.shape[0], 64)
    cum, states = torch.zeros_like(active), []
    for i, blk in enumerate(blocks):
        bias = torch.cat([torch.zeros(x.shape[0], 1), (1 - active) * HALTED_LOGIT], 1)
        mask = bias[:, None, None, :].expand(-1, blk.attn.num_heads, x.shape[1], -1).reshape(-1, x.shape[1], x.shape[1])
        keep = torch.cat([torch.ones(x.shape[0], 1), active], 1).bool().unsqueeze(-1)
        x = torch.where(keep, blk(x, attn_mask=mask), x)
        states.append(x)
        h = active if i == len(blocks) - 1 else halting(x[:, 1:]) * active
        cum = cum + h
        active = active * (cum < threshold)
    return enc.pool(x), cum, states


def test_halted_tokens_are_frozen_and_masked(tiny, tiny_pixels):
    halting = HaltingHead(3.0, -1.0)  # data-dependent: some tokens halt after block 0, others run on
    enc = AViTVisionTransformer(tiny.visual, schedule_for(tiny, "none"), halting, 0.99).eval()
    with torch.no_grad():
        emb, info = enc.forward_halting(tiny_pixels)
        ref_emb, ref_cum, states = _reference(tiny, tiny_pixels, halting, 0.99)
    counts = info["active"]
    assert (counts[:, 0] == 64).all() and (counts[:, 1] < 64).any() and (counts[:, 1] > 0).any()
    assert torch.allclose(info["cumulative"], ref_cum, atol=1e-5)
    assert torch.allclose(emb, ref_emb, atol=1e-5)  # halted keys are out of every later attention
    halted0 = torch.cat([torch.zeros(7, 1, dtype=torch.bool), halting(states[0][:, 1:]) >= 0.99], 1)
    final = info["tokens"]
    assert torch.allclose(final[halted0], states[0][halted0], atol=1e-5)  # halted after block 0: frozen
    assert not torch.allclose(final[~halted0], states[0][~halted0])  # the others (CLS included) moved on


def test_nothing_halts_equals_unpruned(tiny, tiny_pixels):
    enc = _masked(tiny, 0.0, -20.0)  # h ~ 0: only the last block's forced halt
    with torch.no_grad():
        emb, info = enc.forward_halting(tiny_pixels)
    assert torch.allclose(emb, tiny.visual(tiny_pixels), atol=1e-5)
    assert info["active"].tolist() == [[64] * 4] * 7


def test_straight_through_bias_is_zero_in_value_and_carries_gradient(tiny, tiny_pixels):
    enc = _masked(tiny, 3.0, -1.0).train()
    enc.straight_through = True
    emb, _ = enc.forward_halting(tiny_pixels)
    with torch.no_grad():
        assert torch.allclose(emb, enc.eval().forward_halting(tiny_pixels)[0], atol=1e-5)
    enc.train()
    enc.forward_halting(tiny_pixels)[0].sum().backward()
    assert enc.halting.gamma.grad is not None and enc.halting.gamma.grad.abs() > 0


def test_threshold_calibration_matches_the_schedule_token_count(tiny, tiny_pixels):
    from prtool.tuning.avit_train import calibrate_threshold, mean_active

    sched = schedule_for(tiny, "1:16,2:16")  # patches entering blocks: 64, 48, 32, 32 -> mean 44
    enc = AViTVisionTransformer(tiny.visual, sched, HaltingHead(1.0, -1.0)).eval()
    cal = calibrate_threshold(enc, tiny_pixels, sched)
    assert cal["target_mean_active"] == 44.0
    assert abs(cal["mean_active"] - 44.0) <= 1.0
    assert mean_active(enc, tiny_pixels, cal["threshold"]).mean().item() == pytest.approx(cal["mean_active"])
    # the prior peaks where an average token stops: a 6-block, 196-patch 4x20 schedule runs 4.60 blocks a token
    assert prior_mean_for(schedule_for_testbed("1:20,2:20,3:19,4:19")) == pytest.approx(6 * 901 / 6 / 196 - 1)


def schedule_for_testbed(text):
    from prtool.encoder.schedule import parse_schedule

    return parse_schedule(text, num_patches=196, depth=6)


def test_fixed_k_form_keeps_the_least_halted(tiny, tiny_pixels):
    halting = HaltingHead(3.0, -1.0)
    enc = AViTTopKVisionTransformer(tiny.visual, schedule_for(tiny, "1:16"), halting, return_indices=True).eval()
    with torch.no_grad():
        _, kept = enc(tiny_pixels)
        cum = halting(enc.transformer.resblocks[0](enc.embed(tiny_pixels))[:, 1:])
    expected = torch.argsort(cum, dim=1, stable=True)[:, :48]
    assert torch.equal(kept.sort(1).values, expected.sort(1).values)


@pytest.fixture()
def avit_weights(tiny, tmp_path):
    from prtool.tuning.avit_train import save_avit

    sched = schedule_for(tiny, "1:16,2:16")
    path = tmp_path / "avit.safetensors"
    save_avit(tuned_state(HaltingHead(3.0, -1.0), tiny.visual), {
        "model_id": tiny.model_id, "thresholds": {sched.to_string(): {"threshold": 0.5}}}, path)
    return path, sched


def test_fixed_k_export_validates_with_constant_topk(tiny, tmp_path, avit_weights):
    from prtool.export.onnx_export import ExportOptions, export_onnx
    from prtool.export.onnx_graph import topk_nodes

    path, sched = avit_weights
    res = export_onnx(tiny, EncoderSpec(sched, "avit-topk", path), tmp_path / "m.onnx", ExportOptions())
    assert res.report.passed, res.report.failure_summary()
    import onnx

    tk = topk_nodes(onnx.load(str(tmp_path / "m.onnx")))
    assert [t["k"] for t in tk] == [48, 32] and all(t["constant_k"] for t in tk)


def test_masking_form_builds_from_weights_and_refuses_uncalibrated(tiny, tiny_pixels, avit_weights):
    path, sched = avit_weights
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(sched, "avit", path))
    assert isinstance(enc, AViTVisionTransformer) and enc.threshold == 0.5
    assert enc.transformer is not tiny.visual.transformer  # tuned LayerNorms live in a copy
    with pytest.raises(PrtoolError, match="no halting threshold for schedule 1:8"):
        build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:8"), "avit", path))


def test_tune_avit_bad_input_is_one_line(capsys):
    code, _, err = cli(capsys, "tune-avit", "--epochs", "0", "--out", "x.safetensors")
    assert code == 1 and err.strip().count("\n") == 0 and "--epochs 0" in err
    code, _, err = cli(capsys, "tune-avit", "--schedules", "1:x", "--out", "x.safetensors")
    assert code == 1 and err.strip().count("\n") == 0


def test_masking_form_exports_without_topk(tiny, tmp_path, avit_weights):
    from prtool.export.onnx_export import ExportOptions, export_onnx

    path, sched = avit_weights
    res = export_onnx(tiny, EncoderSpec(sched, "avit", path), tmp_path / "m.onnx", ExportOptions())
    assert res.report.passed, res.report.failure_summary()


def test_tuned_state_round_trips_row0_only(tiny):
    from prtool.encoder.avit import apply_tuned_state

    state = tuned_state(HaltingHead(2.0, -3.0), tiny.visual)
    key = "transformer.resblocks.1.mlp.c_proj.weight"
    assert state[key].shape == (1, tiny.visual.transformer.resblocks[1].mlp.c_proj.weight.shape[1])
    state[key] = state[key] + 1.0
    visual, halting = apply_tuned_state(tiny.visual, state)
    new, old = visual.transformer.resblocks[1].mlp.c_proj.weight, tiny.visual.transformer.resblocks[1].mlp.c_proj.weight
    assert torch.allclose(new[0], old[0] + 1.0) and torch.equal(new[1:], old[1:])  # row 0 only; the shared tower kept
    assert halting.gamma.item() == 2.0 and halting.beta.item() == -3.0
