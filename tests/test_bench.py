import json

import pytest

from prtool.bench.accuracy import bench_accuracy, markdown_table, paired_gaps, plot_accuracy_vs_flops
from prtool.bench.speed import bench_speed
from prtool.data.datasets import load_dataset
from prtool.encoder.build import schedule_for
from prtool.errors import PrtoolError


@pytest.fixture(scope="module")
def small_testbed():
    return load_dataset("testbed", "test").limit(20)


def test_bench_accuracy_rows_and_reports(tiny_testbed_like, small_testbed, tmp_path):
    loaded = tiny_testbed_like
    scheds = [schedule_for(loaded, "1:20,2:20,3:19,4:19"), schedule_for(loaded, keep_ratio=0.5, first_block=1)]
    res = bench_accuracy(loaded, small_testbed, scheds, ["none", "random", "cls-attn", "evit", "tome", "brightness"],
                         seeds=[0, 1])
    methods = [(r["method"], r["schedule"]) for r in res["rows"]]
    assert methods[0] == ("none", "none") and ("tome", "1:20,2:20,3:19,4:19") in methods
    by = {(r["method"], r["schedule"]): r for r in res["rows"]}
    # equal cost: every method at a schedule sees the same tokens per block
    tpb = {r["method"]: r["tokens_per_block"] for r in res["rows"] if r["schedule"] == "1:20,2:20,3:19,4:19"}
    assert len({tuple(v) for v in tpb.values()}) == 1
    assert by[("random", "1:98")]["top1_per_seed"] and len(by[("random", "1:98")]["top1_per_seed"]) == 2
    assert by[("none", "none")]["mean_cosine"] == 1.0
    md = markdown_table(res)
    assert "| tome | 1:20,2:20,3:19,4:19 | 118 |" in md
    plot_accuracy_vs_flops(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert len(paired_gaps(res, "cls-attn", "random")) == 2
    # without patch-ranking, each pruned row is paired with the unpruned model on the same images
    base = by[("none", "none")]["top1"]
    for r in res["rows"][1:]:
        assert r["paired_vs"] == "none" and r["paired_diff"] == pytest.approx(r["top1"] - base) and r["paired_se"] >= 0
    assert "paired_vs" not in by[("none", "none")] and "± " in md
    with pytest.raises(PrtoolError, match="needs --predictor"):
        bench_accuracy(loaded, small_testbed, scheds, ["patch-ranking"])


def test_bench_speed_structure(tiny, tmp_path):
    res = bench_speed(tiny, "1:16,2:16", None, 1, None, ["baseline", "patch-ranking", "static", "evit", "tome"],
                      ["torch", "onnxruntime"], [2], warmup=1, iters=3, workdir=tmp_path)
    rows = [r for r in res["results"] if r["variant"] != "machinery-share"]
    assert {(r["backend"], r["variant"]) for r in rows} >= {("onnxruntime", "tome"), ("torch", "baseline")}
    # MACs by hand for the tiny tower (width 32, 64 patches of 8x8, embed 24, 4 blocks of 12 n D^2 + 2 n^2 D):
    # unpruned 4 blocks of 65 tokens; static keeps 65, 49, 33, 33 tokens and spends nothing on choosing them
    block = lambda n: 12 * n * 32 * 32 + 2 * n * n * 32  # noqa: E731
    rest = 64 * 3 * 8 * 8 * 32 + 32 * 24
    base_macs, static_macs = 4 * block(65) + rest, block(65) + block(49) + 2 * block(33) + rest
    for r in rows:
        same = {x["variant"]: x for x in rows if x["backend"] == r["backend"] and x["batch"] == r["batch"]}
        assert r["p50_ms"] > 0 and r["speedup"] * r["p50_ms"] == pytest.approx(same["baseline"]["p50_ms"])
        assert r["measured_over_ideal"] * r["ideal_speedup"] == pytest.approx(r["speedup"])
        if r["variant"] == "baseline":
            assert r["gmacs"] == pytest.approx(base_macs / 1e9) and r["ideal_speedup"] == 1.0
        if r["variant"] == "static":
            assert r["gmacs"] == pytest.approx(static_macs / 1e9)
            assert r["ideal_speedup"] == pytest.approx(base_macs / static_macs)
        if r["variant"] in ("patch-ranking", "evit", "tome"):  # same blocks as static, plus their selection work
            assert r["ideal_speedup"] < base_macs / static_macs
    shares = [r for r in res["results"] if r["variant"] == "machinery-share"]
    assert len(shares) == 2
    json.dumps(res)


@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "tensorrt"])
def test_bench_speed_gpu_backend_without_gpu_is_one_clear_error(tiny, tmp_path, backend):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu/trt tests cover it")
    with pytest.raises(PrtoolError, match="pip install|TensorRT|CUDAExecutionProvider") as exc:
        bench_speed(tiny, "1:16", None, 1, None, ["baseline"], [backend], [1], warmup=0, iters=1, workdir=tmp_path)
    assert "\n" not in str(exc.value)


@pytest.mark.gpu
def test_bench_speed_onnxruntime_cuda(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    res = bench_speed(tiny, "1:16", None, 1, None, ["baseline", "patch-ranking"], ["onnxruntime-cuda"], [2],
                      warmup=1, iters=3, workdir=tmp_path)
    assert {r["device"] for r in res["results"] if "device" in r} == {"cuda"}


@pytest.mark.trt
def test_bench_speed_tensorrt(tiny, tmp_path):
    res = bench_speed(tiny, "1:16", None, 1, None, ["baseline", "patch-ranking"], ["tensorrt"], [1, 2],
                      warmup=1, iters=3, workdir=tmp_path)
    rows = [r for r in res["results"] if r["variant"] != "machinery-share"]
    assert len(rows) == 4 and all(r["device"] == "cuda" and r["p50_ms"] > 0 for r in rows)


def test_ort_sessions_do_not_spin(tiny, tmp_path):
    """Interleaved timing needs idle sessions to sleep: spinning threads steal the active one's cores."""
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.export.onnx_export import ExportOptions, export_onnx
    from prtool.runtime.session import ort_session

    path = export_onnx(tiny, EncoderSpec(schedule_for(tiny, "none")), tmp_path / "m.onnx",
                       ExportOptions(validate=False)).onnx_path
    opts = ort_session(path).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
