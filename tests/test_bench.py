import json

import pytest

from prtool.bench_accuracy import bench_accuracy, markdown_table, paired_gaps, plot_accuracy_vs_flops
from prtool.bench_speed import bench_speed
from prtool.build import schedule_for
from prtool.datasets import load_dataset
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
    with pytest.raises(PrtoolError, match="needs --predictor"):
        bench_accuracy(loaded, small_testbed, scheds, ["patch-ranking"])


def test_bench_speed_structure(tiny, tmp_path):
    res = bench_speed(tiny, "1:16,2:16", None, 1, None, ["baseline", "patch-ranking", "static", "evit", "tome"],
                      ["torch", "onnxruntime"], [2], warmup=1, iters=3, workdir=tmp_path)
    rows = [r for r in res["results"] if r["variant"] != "machinery-share"]
    assert {(r["backend"], r["variant"]) for r in rows} >= {("onnxruntime", "tome"), ("torch", "baseline")}
    for r in rows:
        assert r["p50_ms"] > 0 and r["measured_over_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    shares = [r for r in res["results"] if r["variant"] == "machinery-share"]
    assert len(shares) == 2
    json.dumps(res)
    with pytest.raises(PrtoolError, match="needs a GPU"):
        bench_speed(tiny, "1:16", None, 1, None, ["baseline"], ["tensorrt"], [1], warmup=0, iters=1, workdir=tmp_path)
