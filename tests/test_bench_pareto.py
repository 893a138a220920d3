import json

import pytest
from conftest import cli

from prtool.bench.pareto import combine_results, markdown_table, pareto_front, parse_budgets, plot_pareto
from prtool.errors import PrtoolError


def test_budgets_parse_to_the_documented_schedules(tiny_testbed_like):
    got = [s.to_string() for s in parse_budgets(tiny_testbed_like, "4x118,4x76,1x60%,1x50%")]
    assert got == ["1:20,2:20,3:19,4:19", "1:30,2:30,3:30,4:30", "1:78", "1:98"]
    with pytest.raises(PrtoolError, match="malformed budget"):
        parse_budgets(tiny_testbed_like, "4-118")


def test_front_keeps_only_undominated_points():
    rows = [{"method": "a", "schedule": "s", "speedup": 1.0, "top1": 70.0},
            {"method": "b", "schedule": "s", "speedup": 1.5, "top1": 69.0},
            {"method": "c", "schedule": "s", "speedup": 1.4, "top1": 68.0},  # b is faster and better
            {"method": "d", "schedule": "s", "speedup": 1.5, "top1": 69.0}]  # ties b: neither dominates
    assert pareto_front(rows) == ["a@s", "b@s", "d@s"]


def test_pareto_end_to_end_on_a_slice(capsys, tmp_path):
    code, out, err = cli(capsys, "bench", "pareto", "-m", "testbed", "-p", "none", "--limit", "12",
                         "--budgets", "4x118",
                         "--methods", "none,patch-ranking,patch-ranking-merge,tome,random-merge", "--batch", "2",
                         "--iters", "2", "--warmup", "1", "-o", tmp_path / "p", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    by = {r["method"]: r for r in res["rows"]}
    assert set(by) == {"none", "patch-ranking", "patch-ranking-merge", "tome", "random-merge"}
    assert by["none"]["speedup"] == 1.0 and by["patch-ranking-merge"]["accuracy_backend"] == "onnxruntime"
    assert by["random-merge"]["timed_by"] == "patch-ranking-merge" and by["random-merge"]["accuracy_backend"] == "torch"
    assert by["random-merge"]["speedup"] == by["patch-ranking-merge"]["speedup"]
    # GFLOPs count each method's own selection work: same tokens per block, different totals
    assert by["tome"]["gflops"] != by["patch-ranking"]["gflops"] != by["patch-ranking-merge"]["gflops"]
    pr = by["patch-ranking-merge"]
    assert pr["vs_tome"]["speedup_ratio"] == pytest.approx(pr["speedup"] / by["tome"]["speedup"])
    assert res["front"] and all("@" in f for f in res["front"])
    for name in ("pareto.json", "pareto.md", "pareto.png"):
        assert (tmp_path / "p" / name).stat().st_size > 200
    assert "| patch-ranking-merge | 1:20,2:20,3:19,4:19 | 118 |" in (tmp_path / "p" / "pareto.md").read_text()
    # two runs (e.g. one per budget) reported as one: one unpruned row, front recomputed
    both = combine_results([res, {**res, "rows": [{**r, "p50_ms": r["p50_ms"]} for r in res["rows"]]}])
    assert [r["method"] for r in both["rows"]].count("none") == 1 and both["runs"] == 2
    plot_pareto(both, tmp_path / "c.png")
    assert "front" in markdown_table(both).lower()


def test_pareto_refusals(capsys, tmp_path):
    code, _, err = cli(capsys, "bench", "pareto", "--methods", "none,random-merge", "--limit", "2", "-o", tmp_path)
    assert code != 0 and "patch-ranking-merge" in err and "Traceback" not in err
    code, _, err = cli(capsys, "bench", "pareto", "--combine", tmp_path / "missing.json", "-o", tmp_path)
    assert code != 0 and "cannot read pareto report" in err


def test_pareto_takes_quantized_rows(capsys, tmp_path):
    import onnx

    methods = "none,none+int8-dynamic,patch-ranking-merge,patch-ranking-merge+int8-dynamic"
    code, out, err = cli(capsys, "bench", "pareto", "-m", "testbed", "-p", "none", "--limit", "8", "--budgets", "4x118",
                         "--methods", methods, "--batch", "2", "--iters", "2", "--warmup", "1", "-o", tmp_path / "p",
                         "--json", "-q")
    assert code == 0, err
    by = {r["method"]: r for r in json.loads(out)["rows"]}
    q, fp32 = by["patch-ranking-merge+int8-dynamic"], by["patch-ranking-merge"]
    assert q["schedule"] == fp32["schedule"] and q["accuracy_backend"] == "onnxruntime" and q["speedup"] > 0

    def ops(row):
        return {n.op_type for n in onnx.load(row["onnx"]).graph.node}

    assert "DynamicQuantizeLinear" in ops(q) and "DynamicQuantizeLinear" not in ops(fp32)
    assert "TopK" in ops(q)  # the ranking path is kept, exact
    unpruned_q = by["none+int8-dynamic"]
    assert unpruned_q["schedule"] == "none" and unpruned_q["gflops"] == by["none"]["gflops"]
    assert "DynamicQuantizeLinear" in ops(unpruned_q)


@pytest.mark.parametrize("methods, fragment", [
    ("none,random-merge+int8-dynamic", "cannot be exported"),
    ("none,patch-ranking-merge+int8-qdq", "--calib-data"),
    ("none,patch-ranking-merge+int4", "unknown quantization"),
])
def test_pareto_refuses_quantized_rows_it_cannot_build(capsys, tmp_path, methods, fragment):
    code, _, err = cli(capsys, "bench", "pareto", "-m", "testbed", "-p", "none", "--limit", "2", "--methods", methods,
                       "-o", tmp_path / "p")
    assert code != 0 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()  # nothing written, not even the folder
