"""``prtool plan`` on the tiny model: end to end, the measurement cache, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_artifacts import TINY, artifacts, run  # noqa: F401 - artifacts is a fixture
from conftest import LAUNCHER

# A small space: one stage, two keep ratios, 4-5 candidates; tiny latency runs (the figures are noise, the logic
# is not). ToMe's first stage ranges over blocks 1 and 2 of the tiny model's 4.
SPACE = ("-d", "testbed", "--speedup", "1.2", "--stages", "1", "--per-group", "3", "--margin", "0.3",
         "--calib-limit", "12", "--batch", "2", "--warmup", "1", "--iters", "2")
SMALL = ("--methods", "tome", "--keep-ratios", "0.6,0.7")


@pytest.fixture
def fake_latency(monkeypatch):
    """Latency proportional to the patches kept (tiny-model timings on a loaded machine are noise), so the
    budget check is deterministic; records which candidates were timed."""
    import prtool.bench.plan as pl
    from prtool.encoder.schedule import parse_schedule

    timed = []

    def fake(paths, loaded, *a):
        n = loaded.visual.grid_size[0] * loaded.visual.grid_size[1]
        timed.extend(k for k in paths if k[0] != "none")
        keep = {k: parse_schedule("" if k[1] == "none" else k[1], n, 99).final_keep for k in paths}
        return {k: {"p50_ms": 10.0 * keep[k] / n} for k in paths}

    monkeypatch.setattr(pl, "time_exports", fake)
    return timed


def _plan(out, *extra):
    code, stdout, err = run("plan", *TINY, *SPACE, "-o", out, "--json", *extra)
    assert code == 0, err[-2000:]
    return json.loads(stdout)


def test_plan_end_to_end_picks_the_most_accurate_within_budget_and_exports_it(artifacts, tmp_path,  # noqa: F811
                                                                               fake_latency):
    import onnxruntime as ort

    r = _plan(tmp_path / "p", "--methods", "patch-ranking,tome", "--keep-ratios", "0.5,0.7",
              "--predictor", artifacts.predictor)
    assert r["survivors"] == len(r["rows"]) > 1 and r["measured"] == r["survivors"]
    assert {row["method"] for row in r["rows"]} == {"patch-ranking", "tome"}
    assert all(row["schedule"].startswith("1:") for row in r["rows"] if row["method"] == "patch-ranking")
    within = [row for row in r["rows"] if row["speedup"] >= r["budget"]["speedup"]]
    assert all(row["within_budget"] == (row in within) for row in r["rows"])
    pick = r["pick"]
    assert pick in within and pick["top1"] == max(row["top1"] for row in within)
    manifest = json.loads((tmp_path / "p" / "pick" / "model.json").read_text())
    assert manifest["plan"]["budget"]["speedup"] == 1.2
    assert manifest["plan"]["calibration_top1"] == pick["top1"]
    assert manifest["plan"]["measured"]["speedup"] == pick["speedup"]
    assert manifest["plan"]["search_space"]["methods"] == ["patch-ranking", "tome"]
    assert manifest["plan"]["calibration"]["split"] == "train" and manifest["plan"]["calibration"]["images"] == 12
    assert manifest["schedule"]["string"] == pick["schedule"]
    sess = ort.InferenceSession(str(tmp_path / "p" / "pick" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixel_values": __import__("numpy").zeros((3, 3, 64, 64), "float32")})[0].shape[0] == 3
    for f in ("plan.json", "plan.md", "plan.png"):
        assert (tmp_path / "p" / f).stat().st_size > 0


def test_pick_rule():
    from prtool.bench.plan import pick

    rows = [{"speedup": 1.5, "top1": 50.0, "gflops": 1.0}, {"speedup": 1.25, "top1": 60.0, "gflops": 2.0},
            {"speedup": 1.1, "top1": 70.0, "gflops": 3.0}]
    assert pick(rows, 1.2) is rows[1]  # the most accurate within the budget, not the most accurate overall
    assert pick(rows, 2.0) is None
    speed_only = [{**r, "top1": None} for r in rows]
    assert pick(speed_only, 1.2) is speed_only[1]  # within the budget, the one that prunes least


def test_a_second_run_measures_nothing(tmp_path, monkeypatch, fake_latency):
    import prtool.bench.plan as pl

    first = _plan(tmp_path / "p", *SMALL)
    assert first["measured"] == first["survivors"] == len(fake_latency) > 1 and first["cached"] == 0

    def boom(*a, **k):
        raise AssertionError("a cached candidate was measured again")

    monkeypatch.setattr(pl, "time_exports", boom)
    monkeypatch.setattr(pl, "evaluate_zero_shot", boom)
    second = _plan(tmp_path / "p", *SMALL)
    assert second["measured"] == 0 and second["cached"] == first["survivors"]
    assert second["rows"] == first["rows"] and second["pick"] == first["pick"]


def _measured_before(entries: dict, kind: str = "latency") -> set[tuple[str, str]]:
    keys = [json.loads(k) for k in entries]
    return {(k["method"], k["schedule"]) for k in keys if k["kind"] == kind}


def test_resume_after_kill_measures_only_what_is_missing(tmp_path, fake_latency):
    out, cache = tmp_path / "p", tmp_path / "p" / "cache.json"
    argv = [sys.executable, "-c", LAUNCHER, "plan", *TINY, *SPACE, *SMALL, "-o", str(out), "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline, before, entries = time.monotonic() + 300, set(), {}
    while time.monotonic() < deadline and proc.poll() is None and len(before) < 2:
        if cache.exists():
            entries = json.loads(cache.read_text())["entries"]
            before = _measured_before(entries)
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = json.loads(cache.read_text())["entries"] if cache.exists() else {}  # what it wrote before dying
    before = _measured_before(entries)
    assert killed and before, "the search was not killed mid-search (it finished, or cached nothing in 300 s)"
    assert not (out / "plan.json").exists() and not (out / "pick").exists()
    r = _plan(out, *SMALL)  # the killed run timed for real; the rerun times with fake_latency
    assert r["pick"] is not None and len(r["rows"]) == r["survivors"] > len(before)
    assert not before & set(fake_latency), "a candidate measured before the kill was measured again"
    assert len(fake_latency) == r["survivors"] - len(before)
    complete = before & _measured_before(entries, "accuracy")  # a kill between the two leaves only the latency
    assert r["cached"] == len(complete) and r["measured"] == r["survivors"] - len(complete)


def test_no_candidate_in_budget_reports_the_front_and_exports_nothing(tmp_path, fake_latency):
    out = tmp_path / "p"
    code, stdout, err = run("plan", *TINY, *SPACE[:2], "--speedup", "1.5", *SPACE[4:], "--methods", "tome",
                            "--keep-ratios", "0.7", "-o", out, "--json")  # fake speedups 64/45 = 1.42x < 1.5x
    r = json.loads(stdout)
    assert code == 0 and r["pick"] is None and r["rows"] and "no measured candidate met the budget" in err
    assert not (out / "pick").exists() and "export" not in r


@pytest.mark.parametrize("args, words", [
    (("--speedup", "1.3", "--budget-ms", "10"), "exactly one budget"),
    (("--speedup", "0.9"), "must be above 1"),
    (("--speedup", "1.3", "--report-split", "train"), "must differ from --calib-split"),
    (("--speedup", "1.3", "--backend", "tensorrt"), "--backend"),
    (("--speedup", "1.3", "--methods", "tome,magic"), "--methods"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    code, stdout, err = run("plan", *TINY, *args, "-o", tmp_path / "p")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and stdout == "" and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "p").exists()
