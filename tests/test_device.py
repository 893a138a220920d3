"""Devices and precisions: --device/--precision, CUDA-event timing, autocast speed runs, precision drift,
rank and train on CUDA. The `gpu` tests run on a GPU machine (benchmarks/device_check.sh runs them)."""

import numpy as np
import pytest
import torch

from prtool.bench.precision_drift import precision_drift
from prtool.bench.speed import _torch_runner, bench_speed
from prtool.data.datasets import load_dataset
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.errors import PrtoolError
from prtool.util.device import autocast, resolve_device
from prtool.util.timing import cuda_event_clock, interleaved_latency

HAS_GPU = torch.cuda.is_available()


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if HAS_GPU else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(PrtoolError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(PrtoolError, match="not supported"):
        resolve_device("meta")
    if not HAS_GPU:
        with pytest.raises(PrtoolError, match="no CUDA GPU .*use --device cpu"):
            resolve_device("cuda")


def test_resolve_device_under_torchrun_picks_the_local_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto") == torch.device("cuda:3") == resolve_device("cuda")
    with pytest.raises(PrtoolError, match="only 4 GPU"):
        resolve_device("cuda:4")


def test_autocast_runs_matmuls_in_the_asked_precision():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast("cpu", "fp32"):
        assert lin(x).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with pytest.raises(PrtoolError, match="--precision 'int8'"):
        autocast("cpu", "int8")


def test_cuda_event_clock_drains_the_queue_then_times_between_events(monkeypatch):
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = "start" if not any(c.endswith("new") for c in calls) else "end"
            calls.append(f"{self.name} new")

        def record(self):
            calls.append(f"{self.name} record")

        def synchronize(self):
            calls.append(f"{self.name} wait")

        def elapsed_time(self, other):
            return 4.5

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    ms = cuda_event_clock()(lambda: calls.append("work"))
    assert ms == 4.5
    assert [c for c in calls if not c.endswith("new")] == ["sync", "start record", "work", "end record", "end wait"]


def test_interleaved_latency_uses_the_given_clock():
    clock_ms = {"a": 2.0, "b": 8.0}
    lat = interleaved_latency({"a": lambda: "a", "b": lambda: "b"}, warmup=1, iters=5, clock=lambda fn: clock_ms[fn()])
    assert lat["a"]["p50_ms"] == 2.0 and lat["b"]["p99_ms"] == 8.0 and lat["a"]["iters"] == 5


def test_torch_runner_runs_in_the_asked_precision(tiny, tiny_pixels):
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "cls-attn"))
    cpu = torch.device("cpu")
    assert _torch_runner(enc, cpu, "fp32", False)(tiny_pixels).dtype == torch.float32
    assert _torch_runner(enc, cpu, "bf16", False)(tiny_pixels).dtype == torch.bfloat16
    with pytest.raises(PrtoolError, match="--cuda-graphs needs --device cuda"):
        _torch_runner(enc, cpu, "fp32", True)


def test_bench_speed_records_device_and_precision(tiny, tmp_path):
    res = bench_speed(tiny, "1:16", None, 1, None, ["baseline", "patch-ranking"], ["torch"], [2], warmup=0, iters=2,
                      workdir=tmp_path, device="cpu", precision="bf16")
    rows = [r for r in res["results"] if "p50_ms" in r]
    assert {(r["device"], r["precision"]) for r in rows} == {("cpu", "bf16")} and len(rows) == 2
    assert res["torch_device"]["device"] == "cpu" and res["torch_precision"] == "bf16"
    with pytest.raises(PrtoolError, match="--precision 'fp8'"):
        bench_speed(tiny, "1:16", None, 1, None, ["baseline"], ["torch"], [1], device="cpu", precision="fp8")


@pytest.fixture(scope="module")
def few_testbed():
    return load_dataset("testbed", "test").limit(12)


def test_precision_drift_rows(tiny_testbed_like, few_testbed):
    loaded = tiny_testbed_like
    specs = {"none": EncoderSpec(schedule_for(loaded, "none")),
             "tome": EncoderSpec(schedule_for(loaded, "1:20,2:20"), "tome")}
    res = precision_drift(loaded, few_testbed, specs, ("fp32", "bf16"), device="cpu", batch_size=5)
    by = {(r["encoder"], r["precision"]): r for r in res["rows"]}
    assert list(by) == [("none", "fp32"), ("none", "bf16"), ("tome", "fp32"), ("tome", "bf16")] and res["images"] == 12
    assert by["none", "fp32"]["mean_cosine_to_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert by["tome", "fp32"]["min_cosine_to_fp32"] == pytest.approx(1.0, abs=1e-6)  # each compared with its own fp32
    assert by["none", "fp32"]["top1_agreement_with_fp32"] == 100.0
    bf16 = by["tome", "bf16"]
    assert 0.99 < bf16["mean_cosine_to_fp32"] < 1 - 1e-7 and bf16["min_cosine_to_fp32"] <= bf16["mean_cosine_to_fp32"]
    assert by["tome", "fp32"]["mean_cosine_to_unpruned_fp32"] < 1 - 1e-6  # merged: not the unpruned embedding
    assert bf16["top1_fp32"] == by["tome", "fp32"]["top1"]


# ---- on a GPU ----

@pytest.mark.gpu
def test_cuda_event_clock_on_the_gpu():
    x = torch.randn(2048, 2048, device="cuda")
    lat = interleaved_latency({"mm": lambda: x @ x}, warmup=2, iters=5, clock=cuda_event_clock())
    assert lat["mm"]["p50_ms"] > 0


@pytest.mark.gpu
def test_bench_speed_torch_on_cuda_with_autocast_and_graphs(tiny, tiny_pixels, tmp_path):
    for graphs, variants in ((False, ["baseline", "patch-ranking", "tome"]), (True, ["baseline", "patch-ranking"])):
        res = bench_speed(tiny, "1:16", None, 1, None, variants, ["torch"], [1, 4], warmup=2, iters=3,
                          workdir=tmp_path, device="cuda", precision="fp16", cuda_graphs=graphs)
        rows = [r for r in res["results"] if "p50_ms" in r]
        assert len(rows) == 2 * len(variants) and all(r["device"] == "cuda" and r["precision"] == "fp16"
                                                      and r["p50_ms"] > 0 for r in rows)
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "cls-attn"))
    dev = torch.device("cuda")
    x = tiny_pixels.to(dev)
    eager = _torch_runner(enc.to(dev), dev, "fp16", False)(x).float()
    graphed = _torch_runner(enc, dev, "fp16", True)
    graphed(x)
    assert torch.allclose(graphed(x).float(), eager, atol=2e-3)  # the replayed graph computes the same embeddings
    enc.cpu()


@pytest.mark.gpu
def test_rank_and_train_on_cuda_match_cpu(tiny, tmp_path):
    from prtool.encoder.models import load_clip
    from prtool.ranking.golden import RankConfig
    from prtool.ranking.jobs import rank_dataset, train_from_store
    from prtool.ranking.predictor_train import PredictorTrainConfig
    from prtool.ranking.store import load_store
    from prtool.util.stats import spearman

    ds = load_dataset("testbed", "train").limit(4)
    tiny_tb = load_clip("testbed")  # trained: its windows move the embedding by more than float noise
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 on both devices (cuDNN convolutions default to TF32)
    try:
        for dev in ("cpu", "cuda"):
            rank_dataset(tiny_tb, ds, tmp_path / dev, RankConfig(1, stride=2), quiet=True, device=dev)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    a, b = load_store(tmp_path / "cpu"), load_store(tmp_path / "cuda")
    assert a.ids == b.ids
    assert np.mean([spearman(x, y) for x, y in zip(a.importance, b.importance)]) > 0.98
    res = train_from_store(tiny_tb, ds, tmp_path / "cuda", tmp_path / "p.safetensors",
                           PredictorTrainConfig(epochs=2, batch_size=2), quiet=True, device="cuda")
    assert res["device"].startswith("cuda") and res["images_per_second"] > 0
    assert np.isfinite(res["val_metrics"]["val_loss"])
    tiny_tb.visual.cpu()


@pytest.mark.gpu
def test_precision_drift_on_cuda(tiny_testbed_like, few_testbed):
    loaded = tiny_testbed_like
    res = precision_drift(loaded, few_testbed, {"none": EncoderSpec(schedule_for(loaded, "none"))}, device="cuda")
    assert res["torch_device"]["device"].startswith("cuda")
    assert all(r["mean_cosine_to_fp32"] > 0.99 for r in res["rows"])
    loaded.visual.cpu()
