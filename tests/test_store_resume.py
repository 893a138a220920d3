"""The rankings store's resume path on hand-written shards (no model, no images): which shards a rerun
verifies and which it recomputes, how an existing plan is kept, upgraded, replaced or refused, and how the
previous index is read. Written against the survivors of `make mutate` (issue #22)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from prtool.errors import PrtoolError
from prtool.ranking.shards import shard_name, write_shard
from prtool.ranking.store import _previous_entries, read_plan, settle_plan, verify_shards

PLAN = {"model": "tiny", "stride": 2, "num_patches": 4, "store_version": 2, "num_images": 5, "shard_size": 2,
        "num_shards": 3}


def _shard(out, s, seed=0):
    """Shard ``s`` of :data:`PLAN` (rows ``2s, 2s + 1``; the last holds row 4 only), written as prtool writes it."""
    rows = range(2 * s, min(5, 2 * s + 2))
    rng = np.random.default_rng(seed + s)
    rankings = np.stack([rng.permutation(4) for _ in rows])
    return write_shard(out / shard_name(s), rankings, rng.random((len(rows), 4)), np.asarray(rows),
                       [f"img{i}" for i in rows])


@pytest.fixture
def store(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    return out, {shard_name(s): _shard(out, s) for s in range(3)}


def test_verified_shards_keep_their_index_entries_and_only_bad_ones_are_recomputed(store, caplog):
    out, previous = store
    good, todo = verify_shards(out, [0, 1, 2], previous, PLAN)
    assert good == {s: previous[shard_name(s)] for s in range(3)} and todo == []
    assert verify_shards(out, [2, 0], previous, PLAN) == ({2: previous[shard_name(2)], 0: previous[shard_name(0)]}, [])
    _shard(out, 1, seed=7)  # a readable shard for the right rows, but not the one the index records
    (out / shard_name(2)).unlink()
    caplog.set_level(logging.WARNING, logger="prtool.ranking.store")
    good, todo = verify_shards(out, [0, 1, 2], previous, PLAN)
    assert good == {0: previous[shard_name(0)]} and todo == [1, 2]
    assert f"{shard_name(1)} is corrupt (sha256" in caplog.text and f"{shard_name(2)} is missing" in caplog.text
    assert f"{shard_name(2)} is corrupt" not in caplog.text


def test_without_an_index_shards_are_checked_for_their_own_rows(store, caplog):
    out, previous = store
    assert verify_shards(out, [0, 1, 2], {}, PLAN)[0] == {s: previous[shard_name(s)] for s in range(3)}
    shutil.copy(out / shard_name(0), out / shard_name(1))  # a valid shard, but of rows 0..1
    (out / shard_name(2)).unlink()
    caplog.set_level(logging.WARNING, logger="prtool.ranking.store")
    assert verify_shards(out, [0, 1, 2], {}, PLAN) == ({0: previous[shard_name(0)]}, [1, 2])
    assert "holds other images than rows 2..3" in caplog.text
    assert "missing" not in caplog.text  # a first run has no index: missing shards are simply to compute


def test_a_store_without_shards_takes_a_new_plan_and_one_with_shards_refuses_it(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    assert read_plan(out) is None
    settle_plan(out, PLAN)
    assert read_plan(out) == PLAN
    settle_plan(out, PLAN)  # the same plan again: kept
    assert read_plan(out) == PLAN
    (out / "index.json").write_text("{}")
    other = {**PLAN, "stride": 1}
    settle_plan(out, other)  # no shard yet: replaced, and the index of the old plan goes
    assert read_plan(out) == other and not (out / "index.json").exists()
    settle_plan(out, PLAN)  # and again without an index to remove
    assert read_plan(out) == PLAN
    _shard(out, 0)
    with pytest.raises(PrtoolError, match=r"another configuration \(differs in stride\): use a new --out"):
        settle_plan(out, other)
    with pytest.raises(PrtoolError, match=r"\(differs in pretrained, stride\)"):  # a key only one plan has
        settle_plan(out, {**other, "pretrained": "none"})
    assert read_plan(out) == PLAN


def test_a_plan_that_differs_only_in_bookkeeping_is_upgraded_in_place(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    old = {k: v for k, v in PLAN.items() if k != "store_version"} | {"store_version": 1, "skip_bad": False}
    (out / "plan.json").write_text(json.dumps(old))
    (out / "index.json").write_text("{}")
    _shard(out, 0)
    settle_plan(out, PLAN)
    assert read_plan(out) == PLAN and (out / "index.json").exists()  # the old index still verifies the shards


def test_an_unreadable_plan_is_written_again(tmp_path, caplog):
    out = tmp_path / "s"
    out.mkdir()
    (out / "plan.json").write_text("{not json")
    caplog.set_level(logging.WARNING, logger="prtool.ranking.store")
    assert read_plan(out) is None and "is not valid JSON" in caplog.text


@pytest.mark.parametrize("index, entries", [
    (None, {}),
    ({"shards": [{"file": "a", "sha256": "x"}, {"file": "b"}]},
     {"a": {"file": "a", "sha256": "x"}, "b": {"file": "b"}}),
    ({"shards": ["a", "b"]}, {"a": {"file": "a"}, "b": {"file": "b"}}),  # a store from before checksums
    ({"shards": [{"bytes": 3}, {"file": "b"}]}, {"b": {"file": "b"}}),  # an entry without a file name is left out
    ("not json", {}),
    ({"plan": 1}, {}),
    ([1, 2], {}),
    ({"shards": None}, {}),  # valid JSON, but no list of shards: was a TypeError traceback
    ({"shards": 5}, {}),
    ({"shards": [{"file": ["a"]}]}, {}),
])
def test_previous_entries_read_every_index_version_and_forgive_a_broken_one(tmp_path, index, entries):
    if index is not None:
        (tmp_path / "index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    assert _previous_entries(tmp_path) == entries
