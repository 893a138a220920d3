"""Golden rankings, the store (resume, torchrun), the predictor, the oracle, pictures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_launcher
from PIL import Image

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.data.datasets import load_dataset
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.errors import PrtoolError
from prtool.ranking.golden import GoldenRanker, RankConfig, windows
from prtool.ranking.jobs import rank_dataset, train_from_store
from prtool.ranking.predictor_train import PredictorTrainConfig, listnet_loss, match_at_k
from prtool.ranking.store import load_store

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(4):
            arr = (np.random.default_rng(c * 10 + i).random((70, 90, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def test_windows():
    w = windows((14, 14), 2, 1)
    assert len(w) == 169 and w[0].tolist() == [0, 1, 14, 15]
    assert len(windows((14, 14), 2, 2)) == 49
    with pytest.raises(PrtoolError):
        windows((14, 14), 15, 1)


def test_ranking_is_a_permutation_and_batching_does_not_change_it(tiny, tiny_pixels):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "none")), normalize=False)
    cfg = RankConfig(1, stride=2)
    r1, imp1 = GoldenRanker(enc, cfg).rank(tiny_pixels[:1])
    r2, imp2 = GoldenRanker(enc, cfg, batched=False).rank(tiny_pixels[:1])
    assert sorted(r1.tolist()) == list(range(64)) and r1.dtype == np.int16
    assert np.allclose(imp1, imp2, atol=1e-5)
    assert (np.diff(imp1[r1.astype(int)]) <= 1e-7).all()  # sorted from most to least important
    g, _ = GoldenRanker(enc, RankConfig(1, stride=2, iters=3)).rank(tiny_pixels[:1])
    assert sorted(g.tolist()) == list(range(64))


def test_label_and_confidence_need_labels(tiny, tmp_path):
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 20, 20)).save(tmp_path / f"{i}.png")
    unlabelled = load_dataset(str(tmp_path), "test")
    for mode in ("label", "confidence"):
        with pytest.raises(PrtoolError, match=f"--score {mode} needs labelled images"):
            rank_dataset(tiny, unlabelled, tmp_path / f"s-{mode}", RankConfig(1, score=mode), quiet=True)
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "none")))
    with pytest.raises(PrtoolError, match="needs class names"):
        GoldenRanker(enc, RankConfig(1, score="label"))


def test_config_mismatch_is_refused(tiny, folder, tmp_path):
    ds = load_dataset(str(folder), "train")
    rank_dataset(tiny, ds.limit(2), tmp_path / "s", RankConfig(1, stride=2), shard_size=2, quiet=True)
    with pytest.raises(PrtoolError, match="another configuration.*stride"):
        rank_dataset(tiny, ds.limit(2), tmp_path / "s", RankConfig(1, stride=1), shard_size=2, quiet=True)
    with pytest.raises(PrtoolError, match="another configuration.*dataset_fingerprint"):
        rank_dataset(tiny, ds.limit(3).subset([0, 2]), tmp_path / "s", RankConfig(1, stride=2), shard_size=2,
                     quiet=True)


def _store_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_resume_after_kill_is_byte_identical(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(60):  # enough work that the kill lands mid-run
        arr = (np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(data / f"{i:03d}.png")
    args = ["rank", "-m", "prtool-tiny", "-p", "none", "--data", data, "--split", "train", "--stride", "1",
            "--shard-size", "1", "--rank-block", "1", "-q"]
    ref = run_cli(*args, "-o", tmp_path / "ref", env=ONE_THREAD)
    assert ref.returncode == 0, ref.stderr
    launcher = write_launcher(tmp_path)
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(launcher), *map(str, args), "-o", str(out)],
                            env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "shard-00002.safetensors").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "shard-00002.safetensors").exists() and not (out / "index.json").exists()
    assert len(list(out.glob("shard-*.safetensors"))) < 60  # really interrupted mid-run
    assert (out / ".lock").exists()  # the killed holder's lock file stays behind; its flock died with it
    res = run_cli(*args, "-o", out, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    assert _store_bytes(out) == _store_bytes(tmp_path / "ref")


def test_torchrun_two_processes_equal_one(folder, tmp_path):
    args = ["rank", "-m", "prtool-tiny", "-p", "none", "--data", str(folder), "--split", "train", "--stride", "2",
            "--shard-size", "2", "--rank-block", "1", "-q"]
    one = run_cli(*args, "-o", tmp_path / "one", env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    launcher = write_launcher(tmp_path)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(launcher), *args, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_store(tmp_path / "one"), load_store(tmp_path / "two")
    assert a.ids == b.ids and np.array_equal(a.rankings, b.rankings)
    assert np.allclose(a.importance, b.importance, atol=1e-6)
    assert _store_bytes(tmp_path / "one") == _store_bytes(tmp_path / "two")


def test_predictor_training_is_seeded_and_usable(tiny, folder, tmp_path):
    ds = load_dataset(str(folder), "train")
    rank_dataset(tiny, ds, tmp_path / "s", RankConfig(1, stride=2), shard_size=6, quiet=True)
    cfg = PredictorTrainConfig(epochs=3, batch_size=4, seed=7)
    r1 = train_from_store(tiny, ds, tmp_path / "s", tmp_path / "p1.safetensors", cfg, quiet=True)
    train_from_store(tiny, ds, tmp_path / "s", tmp_path / "p2.safetensors", cfg, quiet=True)
    assert (tmp_path / "p1.safetensors").read_bytes() == (tmp_path / "p2.safetensors").read_bytes()
    assert set(r1["val_metrics"]) >= {"match@64", "match@38", "val_loss", "spearman", "train_loss"}
    # the weights kept are the best validation epoch's (match@k_final, then lower loss), not the last
    history = json.loads((tmp_path / "p1.json").read_text())["history"]
    best = max(history, key=lambda h: (h["match@38"], -h["val_loss"]))
    assert r1["best_epoch"] == best["epoch"] and r1["val_metrics"] == best
    # the trained predictor exports and validates against its own model
    from prtool.export.onnx_export import ExportOptions, export_onnx

    res = export_onnx(tiny, EncoderSpec(schedule_for(tiny, "1:26"), "predictor", tmp_path / "p1.safetensors"),
                      tmp_path / "m.onnx", ExportOptions())
    assert res.report.passed and res.manifest["predictor_meta"]["rank_block"] == 1
    # ... and is refused for a schedule starting at another block
    with pytest.raises(PrtoolError, match="rank_block=1, but this model/schedule has rank_block=2"):
        export_onnx(tiny, EncoderSpec(schedule_for(tiny, "2:26"), "predictor", tmp_path / "p1.safetensors"),
                    tmp_path / "m2.onnx", ExportOptions())


def test_listnet_and_match():
    imp = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    good, bad = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert listnet_loss(good, imp, 0.5) < listnet_loss(bad, imp, 0.5)
    gold = torch.tensor([[0, 1, 2, 3]])
    assert match_at_k(good, gold, 2) == 1.0 and match_at_k(bad, gold, 2) == 0.0


def test_golden_oracle_eval_and_show(tiny, folder, tmp_path):
    ds = load_dataset(str(folder), "train")
    rank_dataset(tiny, ds, tmp_path / "s", RankConfig(1, stride=2), shard_size=6, quiet=True)
    sched = schedule_for(tiny, "1:32")
    res = evaluate_zero_shot(tiny, ds, EncoderSpec(sched, "golden"), rankings=tmp_path / "s")
    assert res["images"] == 12 and res["scorer"] == "golden" and 0 < res["mean_cosine_to_reference"] <= 1.0001
    with pytest.raises(PrtoolError, match="computed at block 1"):
        evaluate_zero_shot(tiny, ds, EncoderSpec(schedule_for(tiny, "2:32"), "golden"), rankings=tmp_path / "s")
    with pytest.raises(PrtoolError, match="needs --rankings"):
        evaluate_zero_shot(tiny, ds, EncoderSpec(sched, "golden"))
    from prtool.bench.show import render_show

    out = render_show(tiny, ds, schedule_for(tiny, "1:16,2:16"), tmp_path / "show.png", tmp_path / "s", None, 3)
    assert out["rows"] == ["golden", "cls-attn"] and Image.open(tmp_path / "show.png").size[0] > 64 * 2 * 6
