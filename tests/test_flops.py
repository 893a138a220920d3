import pytest

from prtool.flops import block_macs, encoder_macs
from prtool.schedule import parse_schedule


def test_vit_b16_hand_count():
    # 12 blocks x (12 * 197 * 768^2 + 2 * 197^2 * 768) + patch embedding 196 * 3 * 16^2 * 768 + proj 768 * 512
    hand = 12 * (12 * 197 * 768**2 + 2 * 197**2 * 768) + 196 * 3 * 256 * 768 + 768 * 512
    got = encoder_macs(parse_schedule("", 196, 12), 768, 16, 512)
    assert got["gmacs"] * 1e9 == pytest.approx(hand)
    assert round(got["gmacs"], 1) == 17.6 and got["gflops"] == pytest.approx(2 * got["gmacs"])


def test_paper_schedule_cost():
    got = encoder_macs(parse_schedule("3:20,5:20,7:20,9:20", 196, 12), 768, 16, 512, scorer_macs=10**6)
    blocks = 3 * block_macs(197, 768) + 2 * (block_macs(177, 768) + block_macs(157, 768) + block_macs(137, 768)) + 3 * block_macs(117, 768)
    assert got["blocks_gmacs"] * 1e9 == pytest.approx(blocks)
    assert got["scorer_gmacs"] == pytest.approx(1e-3)
    assert 13.8 < got["gmacs"] < 14.0
