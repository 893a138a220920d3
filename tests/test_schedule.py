import pytest

from prtool.encoder.schedule import default_first_block, derive_schedule, parse_schedule, resolve_schedule
from prtool.errors import PrtoolError


def test_paper_schedule():
    s = parse_schedule("3:20,5:20,7:20,9:20", 196, 12)
    assert s.keep == (176, 156, 136, 116)
    assert s.blocks == (3, 5, 7, 9)
    assert s.tokens_per_block() == [197] * 3 + [177] * 2 + [157] * 2 + [137] * 2 + [117] * 3
    assert s.to_dict()["removed_fraction"] == pytest.approx(80 / 196, abs=1e-4)


def test_empty_schedule():
    for text in ("", "none", " NONE "):
        s = parse_schedule(text, 196, 12)
        assert s.is_empty and s.final_keep == 196 and s.keep == ()


def test_derived_schedules():
    assert derive_schedule(0.6, 4, 196, 12).to_string() == "3:20,5:20,7:19,9:19"
    assert derive_schedule(0.6, 1, 196, 12).to_string() == "3:78"
    assert derive_schedule(0.5, 1, 196, 6, first_block=2).to_string() == "2:98"
    assert derive_schedule(1.0, 2, 196, 12).is_empty
    assert default_first_block(12) == 3 and default_first_block(6) == 1 and default_first_block(24) == 7
    s = derive_schedule(0.6, 4, 196, 6)
    assert s.blocks == (1, 2, 3, 4) and s.final_keep == 118


@pytest.mark.parametrize(
    "text, message",
    [
        ("3:0", "at least one token"),
        ("3:-4", "at least one token"),
        ("3:196", "at least one patch token must be kept"),
        ("3:100,5:96", "at least one patch token must be kept"),
        ("12:20", "outside 0..11"),
        ("5:20,3:20", "increase strictly"),
        ("3:20,3:20", "increase strictly"),
        ("3-20", "malformed"),
        ("3:20,", "malformed"),
        ("a:b", "malformed"),
    ],
)
def test_impossible_schedules(text, message):
    with pytest.raises(PrtoolError, match=message):
        parse_schedule(text, 196, 12)


def test_derive_errors():
    with pytest.raises(PrtoolError, match="keep-ratio"):
        derive_schedule(0.0, 1, 196, 12)
    with pytest.raises(PrtoolError, match="do not fit"):
        derive_schedule(0.6, 4, 196, 12, first_block=10)
    with pytest.raises(PrtoolError, match="either --schedule or --keep-ratio"):
        resolve_schedule("3:20", 0.6, 1, None, 196, 12)
