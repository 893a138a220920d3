"""The rankings store's shard checks and the predictor/weights refusals, unit by unit: each case was written
against a mutant that `make mutate` over prtool.ranking.shards, check_predictor_fits and same_weights left
alive (issue #22; benchmarks/results/mutate-store-predictor-cpu-2t-amd-epyc.md): shards written in the store's
dtypes whatever the caller passes, a shard read against its index entry, shards holding other rows than the
plan says, shards with a wrong dtype, a missing tensor or inconsistent shapes, and predictors or tokens made
for another architecture or another checkpoint of the same one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from safetensors.numpy import save

from prtool.encoder.models import check_same_weights, same_weights
from prtool.encoder.predictor import check_predictor_fits
from prtool.errors import PrtoolError
from prtool.ranking.shards import CorruptShard, read_shard, write_shard

N = 6  # patches


def _arrays(sample_index):
    """int64 permutations, float64 importance, a plain list of rows: what a caller may hand write_shard."""
    rng = np.random.default_rng(len(sample_index))
    n = len(sample_index)
    return np.stack([rng.permutation(N) for _ in range(n)]), rng.random((n, N)), list(sample_index)


def _shard(tmp_path, sample_index=(2, 3), skipped=(), ids=None, importance=None):
    rankings, imp, index = _arrays(sample_index)
    path = tmp_path / "shard-00001.safetensors"
    ids = [f"img{i}" for i in index] if ids is None else ids
    entry = write_shard(path, rankings, imp if importance is None else importance, index, ids, list(skipped))
    return path, entry


def test_a_shard_is_written_in_the_stores_dtypes_whatever_it_is_given(tmp_path):
    rankings, importance, index = _arrays((2, 3))
    path, entry = _shard(tmp_path)
    for e in (None, entry):
        shard = read_shard(path, N, e)
        assert (shard.rankings.dtype, shard.importance.dtype, shard.sample_index.dtype) == (
            np.int16, np.float32, np.int64)
        assert np.array_equal(shard.rankings, rankings) and np.allclose(shard.importance, importance, atol=1e-7)
        assert shard.sample_index.tolist() == index and shard.ids == ["img2", "img3"]
    empty = tmp_path / "empty.safetensors"  # every image skipped: the store passes float64 zeros and no rows
    write_shard(empty, np.zeros((0, N)), np.zeros((0, N)), np.asarray([]), [], ["a", "b"])
    assert read_shard(empty, N, rows=range(4, 6)).skipped == ["a", "b"]


def test_a_shard_that_matches_its_index_entry_is_checked_by_its_sha256(tmp_path):
    path, entry = _shard(tmp_path)
    assert read_shard(path, N, entry).check == "sha256"
    assert read_shard(path, N).check == "content"  # no entry yet: the shard's own content checksum
    assert read_shard(path, N, {"file": entry["file"]}).check == "content"  # an entry from before checksums
    only_sha = {"file": entry["file"], "sha256": entry["sha256"]}  # no size recorded: the sha256 alone decides
    assert read_shard(path, N, only_sha).check == "sha256"
    with pytest.raises(CorruptShard, match="differs from the"):
        read_shard(path, N, {**only_sha, "sha256": "0" * 64})


@pytest.mark.parametrize("sample_index, skipped, rows, ok", [
    ((2, 3), (), range(2, 4), True),
    ((2, 3), ("x",), range(2, 5), True),  # a skipped image counts as one of the rows
    ((2, 3), (), range(2, 5), False),  # a row neither ranked nor skipped
    ((0, 1), (), range(2, 4), False),  # as many images, other rows
    ((1, 2), (), range(2, 4), False),  # one row below the range
    ((3, 4), (), range(2, 4), False),  # one row at its end (exclusive)
])
def test_a_shard_holding_other_rows_than_the_plan_says_is_corrupt(tmp_path, sample_index, skipped, rows, ok):
    path, entry = _shard(tmp_path, sample_index, skipped)
    assert read_shard(path, N, entry).sample_index.tolist() == list(sample_index)  # rows unknown: not checked
    if ok:
        assert read_shard(path, N, entry, rows).sample_index.tolist() == list(sample_index)
    else:
        with pytest.raises(CorruptShard, match=f"holds other images than rows {rows.start}..{rows.stop - 1}"):
            read_shard(path, N, entry, rows)


def _legacy(tmp_path, tensors: dict, ids) -> object:
    """A shard as prtool wrote it before checksums (``ids`` metadata only): checked for structure alone."""
    path = tmp_path / "old.safetensors"
    path.write_bytes(save(tensors, metadata={"ids": json.dumps(ids)}))
    return path


@pytest.mark.parametrize("key, arr, why", [
    ("rankings", np.stack([np.arange(N)] * 2).astype(np.int32), "tensor 'rankings' is missing or not int16"),
    ("importance", None, "tensor 'importance' is missing or not float32"),
])
def test_a_shard_with_a_wrong_dtype_or_a_missing_tensor_is_corrupt(tmp_path, key, arr, why):
    tensors = {"rankings": np.stack([np.arange(N)] * 2).astype(np.int16), "importance": np.ones((2, N), np.float32),
               "sample_index": np.arange(2)}
    assert read_shard(_legacy(tmp_path, tensors, ["a", "b"]), N).check == "structure"
    tensors = {k: v for k, v in {**tensors, key: arr}.items() if v is not None}
    with pytest.raises(CorruptShard, match=why):
        read_shard(_legacy(tmp_path, tensors, ["a", "b"]), N)


@pytest.mark.parametrize("ids, importance", [
    (["img2"], None),  # fewer ids than images
    (None, np.ones((2, N + 1))),  # importance for another number of patches
])
def test_a_shard_with_inconsistent_shapes_is_corrupt_though_its_checksum_matches(tmp_path, ids, importance):
    path, entry = _shard(tmp_path, ids=ids, importance=importance)  # the checksum is of what was written
    for e in (None, entry):
        with pytest.raises(CorruptShard, match=f"inconsistent shapes for {N} patches and 2 images"):
            read_shard(path, N, e)


TINY = {"model": "prtool-tiny", "pretrained": "none", "checkpoint_sha256": None}
SHA = "ab" * 32


def _meta(**model_id):
    return {"predictor": {"num_patches": 64, "dim": 32}, "rank_block": 1, "model_id": {**TINY, **model_id}}


@pytest.mark.parametrize("made_for, model_id, same", [
    (TINY, TINY, True),
    (TINY, {**TINY, "pretrained": "openai"}, False),
    ({**TINY, "checkpoint_sha256": SHA}, {**TINY, "checkpoint_sha256": SHA}, True),
    ({**TINY, "checkpoint_sha256": SHA, "pretrained": "x"}, {**TINY, "checkpoint_sha256": SHA}, True),
    ({**TINY, "checkpoint_sha256": SHA}, TINY, False),  # a checkpoint file against the same tag without one
    (TINY, {**TINY, "checkpoint_sha256": SHA}, False),  # ... and the other way round
    ({**TINY, "checkpoint_sha256": SHA}, {**TINY, "checkpoint_sha256": "cd" * 32}, False),
    ({**TINY, "model": "ViT-B-16"}, TINY, False),
])
def test_same_weights_compares_the_checkpoint_where_either_side_has_one(made_for, model_id, same):
    assert same_weights(made_for, model_id) is same
    assert same_weights(model_id, made_for) is same


def test_artifacts_made_for_other_weights_are_refused_unless_allowed(caplog):
    assert check_same_weights("tokens", "t.safetensors", TINY, TINY) is True
    with pytest.raises(PrtoolError, match=r"tokens t.safetensors was made for prtool-tiny / none \(sha256 ababab"):
        check_same_weights("tokens", "t.safetensors", {**TINY, "checkpoint_sha256": SHA}, TINY)
    caplog.set_level(logging.WARNING, logger="prtool.encoder.models")
    assert check_same_weights("tokens", "t.safetensors", {**TINY, "checkpoint_sha256": SHA}, TINY, True) is False
    assert "tokens t.safetensors was made for" in caplog.text and "used anyway (--allow-other-weights)" in caplog.text


@pytest.mark.parametrize("meta, here", [
    (_meta(checkpoint_sha256=SHA), TINY),
    (_meta(), {**TINY, "checkpoint_sha256": SHA}),
])
def test_a_predictor_for_another_checkpoint_of_the_architecture_is_refused_unless_allowed(meta, here, caplog):
    assert check_predictor_fits(meta, meta["model_id"], 1, 64, 32, "p.safetensors") is True
    with pytest.raises(PrtoolError, match=r"predictor p.safetensors was made for prtool-tiny / none.* but the "
                                          r"model is prtool-tiny / none"):
        check_predictor_fits(meta, here, 1, 64, 32, "p.safetensors")
    caplog.set_level(logging.WARNING, logger="prtool.encoder.models")
    assert check_predictor_fits(meta, here, 1, 64, 32, "p.safetensors", allow_other_weights=True) is False
    assert "predictor p.safetensors was made for" in caplog.text


@pytest.mark.parametrize("allow", [False, True])
def test_a_predictor_for_another_architecture_is_refused_even_when_other_weights_are_allowed(allow):
    meta = _meta(model="ViT-B-16")
    with pytest.raises(PrtoolError, match="predictor p.safetensors was trained for model 'ViT-B-16', not "
                                          "'prtool-tiny'"):
        check_predictor_fits(meta, TINY, 1, 64, 32, "p.safetensors", allow_other_weights=allow)
    legacy = {**meta, "model_id": None}  # a predictor from before model ids: its weights cannot be told apart
    with pytest.raises(PrtoolError, match="predictor p.safetensors was made for None / None"):
        check_predictor_fits(legacy, TINY, 1, 64, 32, "p.safetensors")
