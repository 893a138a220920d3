"""Stores and artifacts that check themselves: corrupt shards found and recomputed, never fed to a
reader; one writer per store; unreadable images found before the work; progress without a terminal."""

import hashlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_cli, write_launcher
from PIL import Image
from test_rank import ONE_THREAD, _store_bytes

from prtool.data.datasets import load_dataset
from prtool.errors import PrtoolError
from prtool.ranking.golden import RankConfig
from prtool.ranking.jobs import rank_dataset
from prtool.ranking.lock import StoreLock
from prtool.ranking.shards import CorruptShard, read_shard
from prtool.ranking.store import load_store
from prtool.util.progress import progress_bar


def _images(root, n, classes=("a", "b")):
    """``n`` images in ``root/train/<class>/`` (a split, as ranked with ``--split train``)."""
    for k in range(n):
        d = root / "train" / classes[k % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        arr = (np.random.default_rng(k).random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{k:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("store-imgs"), 8)


def _rank(tiny, data, out, **kw):
    return rank_dataset(tiny, load_dataset(str(data), "train"), out, RankConfig(1, stride=2),
                        **{"shard_size": 2, "quiet": True, **kw})


def _flip(path, tensor="importance"):
    """Flip one bit in the middle of ``tensor``'s data (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    lo, hi = json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"]
    data[8 + header_len + (lo + hi) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _cli_rank_args(data, *extra):
    return ["rank", "-m", "prtool-tiny", "-p", "none", "--data", str(data), "--split", "train", "--rank-block", "1",
            *extra]


def test_damaged_shards_are_recomputed_alone_and_the_store_ends_byte_identical(tiny, folder, tmp_path):
    out = tmp_path / "s"
    first = _rank(tiny, folder, out)
    assert first["computed"] == [f"shard-0000{i}.safetensors" for i in range(4)]
    ref = _store_bytes(out)
    index = json.loads((out / "index.json").read_text())
    for e in index["shards"]:  # the index records each file's size and sha256
        data = (out / e["file"]).read_bytes()
        assert e == {"file": e["file"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    os.truncate(out / "shard-00001.safetensors", 100)
    (out / "shard-00003.safetensors").unlink()
    again = _rank(tiny, folder, out)
    assert again["computed"] == ["shard-00001.safetensors", "shard-00003.safetensors"]
    assert again["verified_shards"] == 2 and _store_bytes(out) == ref
    _flip(out / "shard-00002.safetensors")
    assert _rank(tiny, folder, out)["computed"] == ["shard-00002.safetensors"] and _store_bytes(out) == ref


def test_a_flipped_byte_is_detected_with_and_without_the_index(tiny, folder, tmp_path):
    out = tmp_path / "s"
    _rank(tiny, folder, out)
    ref = _store_bytes(out)
    _flip(out / "shard-00001.safetensors")
    with pytest.raises(PrtoolError, match=r"shard-00001.safetensors is corrupt \(sha256 .* differs from .* the index "
                                          r"records\): repair it by rerunning the `prtool rank`"):
        load_store(out)
    # an interrupted run has no index yet: the shard's own checksum catches the flip
    with pytest.raises(CorruptShard, match="does not match the checksum it was written with"):
        read_shard(out / "shard-00001.safetensors", 64)
    (out / "index.json").unlink()
    assert _rank(tiny, folder, out)["computed"] == ["shard-00001.safetensors"] and _store_bytes(out) == ref


def test_train_on_a_corrupt_store_is_one_line_and_its_repair_command_works(folder, tmp_path):
    store, pred = tmp_path / "s", tmp_path / "p.safetensors"
    made = run_cli(*_cli_rank_args(folder, "--stride", "2", "--shard-size", "3", "-q"), "-o", store, env=ONE_THREAD)
    assert made.returncode == 0, made.stderr
    ref = _store_bytes(store)
    _flip(store / "shard-00002.safetensors", "rankings")
    train = ["train", "-r", store, "-m", "prtool-tiny", "-p", "none", "--data", folder, "--split", "train",
             "--epochs", "1", "-o", pred, "--json"]
    res = run_cli(*train, env=ONE_THREAD)
    assert res.returncode == 1 and res.stdout == "" and not pred.exists()
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert f"rankings shard {store}/shard-00002.safetensors is corrupt" in res.stderr
    repair = re.search(r"repair it with `prtool (.*?)`", res.stderr).group(1)
    fixed = run_cli(*shlex.split(repair), "--json", env={**ONE_THREAD, "PRTOOL_PROGRESS_SECONDS": "0"})
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["computed"] == ["shard-00002.safetensors"] and _store_bytes(store) == ref
    assert "is corrupt (sha256" in fixed.stderr and "rank: 2/2 images (100%)" in fixed.stderr  # says why; progress
    assert run_cli(*train, env=ONE_THREAD).returncode == 0 and pred.exists()


def _hold_lock(path):
    """A process that takes the store lock and sleeps; returns once it holds it."""
    code = ("import sys, time; from prtool.ranking.lock import StoreLock; StoreLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_refuses_a_live_holder_and_not_a_killed_one(tmp_path, caplog):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(PrtoolError, match=rf"is being written by another `prtool rank` \(pid {holder.pid} on "):
            StoreLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # kill -9 leaves the file behind ...
    caplog.set_level(logging.INFO, logger="prtool.ranking.lock")
    with StoreLock(tmp_path):  # ... but not the lock
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"(pid {holder.pid} on " in caplog.text and "is no longer running; taking over" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_a_second_rank_on_a_busy_store_refuses_in_one_line(folder, tmp_path):
    held = StoreLock(tmp_path / "s")
    (tmp_path / "s").mkdir()
    with held:
        res = run_cli(*_cli_rank_args(folder, "--stride", "2", "--shard-size", "4"), "-o", tmp_path / "s",
                      env=ONE_THREAD)
    assert res.returncode == 1 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert f"(pid {os.getpid()} on " in res.stderr and not list((tmp_path / "s").glob("shard-*"))


def test_two_concurrent_ranks_do_the_work_once(tmp_path):
    data = _images(tmp_path / "data", 24, classes=("x",))
    args = _cli_rank_args(data, "--stride", "1", "--shard-size", "2", "--json")
    ref = run_cli(*args, "-o", tmp_path / "ref", env=ONE_THREAD)
    assert ref.returncode == 0, ref.stderr
    launcher, out = write_launcher(tmp_path), tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, str(launcher), *map(str, args), "-o", str(out)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ONE_THREAD})
             for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    done = [json.loads(o) for o, _, rc in results if rc == 0]
    refused = [e for _, e, rc in results if rc != 0]
    assert done and sum(r["computed_shards"] for r in done) == 12  # every shard computed exactly once
    assert all(len(e.strip().splitlines()) == 1 and "is being written by another `prtool rank`" in e for e in refused)
    assert _store_bytes(out) == _store_bytes(tmp_path / "ref")


def test_a_corrupt_image_is_found_before_any_work_and_removing_it_works(tiny, tmp_path):
    data = _images(tmp_path / "data", 6)
    bad = data / "train" / "b" / "003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(PrtoolError, match=r"image .*003.png cannot be decoded \(.*\): remove or replace the file\(s\) "
                                          r"and rerun, or rerun with --skip-bad"):
        _rank(tiny, data, tmp_path / "s")
    assert not list((tmp_path / "s").glob("shard-*"))  # found before the heavy work
    bad.unlink()  # the dataset changed, but the store held nothing yet: its plan is replaced
    assert _rank(tiny, data, tmp_path / "s")["computed_shards"] == 3


def test_a_corrupt_image_keeps_finished_shards_and_both_recoveries_resume(tiny, tmp_path):
    data = _images(tmp_path / "data", 6)
    out = tmp_path / "s"
    _rank(tiny, data, out)
    ref = _store_bytes(out)
    img = data / "train" / "b" / "003.png"  # row 4 (class a holds images 0, 2, 4; class b 1, 3, 5): shard 2
    good = img.read_bytes()
    img.write_bytes(good[:200])  # a truncated copy
    (out / "shard-00002.safetensors").unlink()  # as if the run had stopped there
    with pytest.raises(PrtoolError, match=r"003.png cannot be decoded .*: replace it with a readable copy of the same "
                                          r"name, or rerun with --skip-bad .* the finished shards are kept"):
        _rank(tiny, data, out)
    assert _store_bytes(out) == {k: v for k, v in ref.items() if k != "shard-00002.safetensors"}
    skipped = _rank(tiny, data, out, skip_bad=True)
    assert skipped["computed"] == ["shard-00002.safetensors"] and skipped["skipped_images"] == 1
    assert json.loads((out / "index.json").read_text())["shards"][2]["skipped"] == [str(img)]
    assert len(load_store(out).ids) == 5
    img.write_bytes(good)  # a readable copy of the same name; drop the shard that left it out
    (out / "shard-00002.safetensors").unlink()
    assert _rank(tiny, data, out)["computed"] == ["shard-00002.safetensors"] and _store_bytes(out) == ref


def test_an_image_that_breaks_during_the_run_keeps_finished_shards(tiny, tmp_path, monkeypatch):
    data = _images(tmp_path / "data", 6)
    (data / "train" / "b" / "003.png").write_bytes(b"broken")  # row 4: shard 2
    monkeypatch.setattr("prtool.ranking.store.unreadable_images", lambda ds, rows: [])  # it decoded before the run
    with pytest.raises(PrtoolError, match="003.png cannot be decoded .*--skip-bad.*finished shards are kept"):
        _rank(tiny, data, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*")) == ["shard-00000.safetensors",
                                                                        "shard-00001.safetensors"]


def _downgrade_to_version_1(out):
    """Rewrite a store as prtool wrote it before checksums: ``ids`` metadata only, an index of names."""
    from safetensors.numpy import load, save_file

    index = json.loads((out / "index.json").read_text())
    for e in index["shards"]:
        path = out / e["file"]
        meta = json.loads(json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
                          ["__metadata__"]["shard"])
        save_file(load(path.read_bytes()), str(path), metadata={"ids": json.dumps(meta["ids"])})
    plan = {**json.loads((out / "plan.json").read_text()), "store_version": 1, "skip_bad": False}
    (out / "plan.json").write_text(json.dumps(plan))
    (out / "index.json").write_text(json.dumps({**plan, "shards": [e["file"] for e in index["shards"]]}))


def test_a_store_from_before_checksums_is_read_checked_and_upgraded(tiny, folder, tmp_path, caplog):
    out = tmp_path / "s"
    _rank(tiny, folder, out)
    new = load_store(out)
    _downgrade_to_version_1(out)
    caplog.set_level(logging.WARNING, logger="prtool.ranking.store")
    old = load_store(out)
    assert old.ids == new.ids and np.array_equal(old.rankings, new.rankings)
    assert "checked for structure only" in caplog.text
    os.truncate(out / "shard-00001.safetensors", 300)
    with pytest.raises(PrtoolError, match="shard-00001.safetensors is corrupt .*not a readable shard"):
        load_store(out)
    up = _rank(tiny, folder, out)  # the same options: recomputes the damaged shard, records every checksum
    assert up["computed"] == ["shard-00001.safetensors"] and up["verified_shards"] == 3
    index = json.loads((out / "index.json").read_text())
    assert index["store_version"] == 2 and all("sha256" in e for e in index["shards"]) and "skip_bad" not in index


def test_default_shard_size_is_minutes_of_work_and_a_store_keeps_its_own(tiny, folder, tmp_path):
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
    from prtool.encoder.flops import block_macs
    from prtool.ranking.golden import GoldenRanker
    from prtool.ranking.store import CPU_MACS_PER_SECOND, SHARD_SECONDS_2CPU, default_shard_size

    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "none")), normalize=False)
    assert GoldenRanker(enc, RankConfig(1, stride=2)).macs_per_image() == 16 * 3 * block_macs(64 + 1 - 4, 32)
    vitb16 = 169 * 9 * block_macs(196 + 1 - 4, 768)  # ViT-B/16, stride 1, from block 3: the paper's setting
    size = default_shard_size(vitb16)
    assert 1 <= size <= 8 and size * vitb16 / CPU_MACS_PER_SECOND <= SHARD_SECONDS_2CPU
    assert default_shard_size(1e6) == 256 and default_shard_size(1e15) == 1
    _rank(tiny, folder, tmp_path / "s", shard_size=3)
    assert _rank(tiny, folder, tmp_path / "s", shard_size=None)["shard_size"] == 3  # resumes, not refused


def test_progress_without_a_terminal_is_logged_at_a_steady_pace(monkeypatch, caplog):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger="prtool.util.progress")
    monkeypatch.setenv("PRTOOL_PROGRESS_SECONDS", "0.05")
    with progress_bar(4, "rank", unit="images") as bar:
        for _ in range(4):
            time.sleep(0.06)
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"rank: 1/4 images \(25%\), \d+\.\d\d images/s, ETA \d+s", lines[0])
    assert len(lines) == 4 and lines[-1].startswith("rank: 4/4 images (100%)") and lines[-1].endswith("ETA done")
    caplog.clear()
    monkeypatch.setenv("PRTOOL_PROGRESS_SECONDS", "3600")
    with progress_bar(4, "rank", unit="images") as bar:
        bar.update(4)
    assert not caplog.records  # nothing for a short job


def test_an_engine_that_does_not_match_its_manifest_is_one_line_naming_both(tmp_path):
    from prtool.deploy.engine_manifest import ENGINE_KIND

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine A")
    (tmp_path / "model.plan.json").write_text(json.dumps(
        {"kind": ENGINE_KIND, "engine_sha256": hashlib.sha256(b"engine B").hexdigest()}))
    res = run_cli("validate", plan)
    assert res.returncode == 1 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert f"manifest {tmp_path}/model.plan.json describes another engine" in res.stderr
    assert f"than {plan} (sha256 {hashlib.sha256(b'engine A').hexdigest()[:12]}" in res.stderr


def test_every_reader_refuses_a_corrupt_store_naming_the_shard(tiny, folder, tmp_path):
    from prtool.bench.evaluate import evaluate_zero_shot
    from prtool.bench.show import render_show
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.ranking.jobs import train_from_store

    out = tmp_path / "s"
    _rank(tiny, folder, out)
    os.truncate(out / "shard-00003.safetensors", 64)
    ds = load_dataset(str(folder), "train")
    readers = {
        "train": lambda: train_from_store(tiny, ds, out, tmp_path / "p.safetensors", quiet=True),
        "eval": lambda: evaluate_zero_shot(tiny, ds, EncoderSpec(schedule_for(tiny, "1:32"), "golden"), rankings=out),
        "show": lambda: render_show(tiny, ds, schedule_for(tiny, "1:16"), tmp_path / "show.png", out, None, 2),
    }
    for read in readers.values():
        with pytest.raises(PrtoolError, match=r"rankings shard .*shard-00003.safetensors is corrupt \(64 bytes, the "
                                              r"index records \d+\): repair it by rerunning the `prtool rank`"):
            read()
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "show.png").exists()
