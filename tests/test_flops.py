import pytest

from prtool.encoder.flops import block_macs, encoder_macs, peer_selection_macs
from prtool.encoder.schedule import parse_schedule


def test_vit_b16_hand_count():
    # 12 blocks x (12 * 197 * 768^2 + 2 * 197^2 * 768) + patch embedding 196 * 3 * 16^2 * 768 + proj 768 * 512
    hand = 12 * (12 * 197 * 768**2 + 2 * 197**2 * 768) + 196 * 3 * 256 * 768 + 768 * 512
    got = encoder_macs(parse_schedule("", 196, 12), 768, 16, 512)
    assert got["gmacs"] * 1e9 == pytest.approx(hand)
    assert round(got["gmacs"], 1) == 17.6 and got["gflops"] == pytest.approx(2 * got["gmacs"])


def test_paper_schedule_cost():
    got = encoder_macs(parse_schedule("3:20,5:20,7:20,9:20", 196, 12), 768, 16, 512, scorer_macs=10**6)
    blocks = (3 * block_macs(197, 768) + 2 * (block_macs(177, 768) + block_macs(157, 768) + block_macs(137, 768))
              + 3 * block_macs(117, 768))
    assert got["blocks_gmacs"] * 1e9 == pytest.approx(blocks)
    assert got["scorer_gmacs"] == pytest.approx(1e-3)
    assert 13.8 < got["gmacs"] < 14.0


def test_peer_selection_hand_count():
    sched = parse_schedule("3:20,5:20", 196, 12)
    evit = (2 * 197 * 768**2 + 197 * 768 + 21 * 768) + (2 * 177 * 768**2 + 177 * 768 + 21 * 768)
    tome = (197 * 768**2 + 98 * 98 * 768 + 20 * 768) + (177 * 768**2 + 88 * 88 * 768 + 20 * 768)
    assert peer_selection_macs("evit", sched, 768) == evit
    assert peer_selection_macs("tome", sched, 768) == tome
    assert peer_selection_macs("random", sched, 768) == 0
    base = encoder_macs(sched, 768, 16, 512)
    got = encoder_macs(sched, 768, 16, 512, selection_macs=tome)
    assert got["gmacs"] - base["gmacs"] == pytest.approx(tome / 1e9)
    assert got["selection_gmacs"] == pytest.approx(tome / 1e9)


def test_encoder_cost_counts_peer_selection(tiny):
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder
    from prtool.encoder.flops import encoder_cost

    sched = parse_schedule("1:8,2:8", 64, 4)
    costs = {m: encoder_cost(build_pruned_encoder(tiny, EncoderSpec(sched, m))[0]) for m in ("random", "evit", "tome")}
    assert costs["random"]["selection_gmacs"] == 0
    for m in ("evit", "tome"):
        assert costs[m]["selection_gmacs"] * 1e9 == pytest.approx(peer_selection_macs(m, sched, 32))
        assert costs[m]["gmacs"] > costs["random"]["gmacs"]


def test_merge_selection_hand_count(tiny):
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder
    from prtool.encoder.flops import encoder_cost, merge_selection_macs

    sched = parse_schedule("3:20,5:20", 196, 12)
    bias = 12 * (2 * 177**2 + 7 * 157**2)  # +log size on 12 heads' T x T logits, blocks 3..11
    assert merge_selection_macs(sched, 768, "fused", 12) == 21 * 768 + 21 * 768 + bias
    tokens = (2 * 20 * 176 * 768 + (196 + 176) * 768) + (2 * 20 * 156 * 768 + (176 + 156) * 768)
    assert merge_selection_macs(sched, 768, "tokens", 12) == tokens + bias
    assert merge_selection_macs(sched, 768, "keys", 12) == tokens + (196 + 176) * 768**2 + bias
    small = parse_schedule("1:8,2:8", 64, 4)
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(small, "cls-attn-merge"))
    assert encoder_cost(enc)["selection_gmacs"] * 1e9 == pytest.approx(merge_selection_macs(small, 32, "fused", 2))
