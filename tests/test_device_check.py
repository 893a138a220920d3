"""benchmarks/device_check: the GPU machine's one prepared run, kept from rotting by its CPU smoke mode."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402
import device_check_report  # noqa: E402


def test_plan_covers_the_issue_and_detects_rank_and_merge(tmp_path, monkeypatch):
    steps = {s["name"]: s for s in device_check.plan(tmp_path, smoke=False)}
    for name in ("env", "gpu_tests", "accuracy", "rank_cuda", "rank_cpu", "compare_rankings", "train_cuda",
                 *(f"speed_{s}_{p}" for s in ("4x20", "keep60") for p in ("fp16", "bf16"))):
        assert name in steps
    speed = " ".join(steps["speed_keep60_bf16"]["argv"])
    assert "--device cuda --precision bf16" in speed and "--batch-sizes 1,32,256" in speed and "ViT-B-16" in speed
    assert "--variants baseline,patch-ranking,patch-ranking-merge," in speed  # prtool has rank-and-merge
    assert "gpu and not trt" in steps["gpu_tests"]["argv"]
    assert "--limit 500 --device cuda" in " ".join(steps["rank_cuda"]["argv"])
    monkeypatch.setattr("prtool.bench.speed.VARIANTS", ("baseline", "patch-ranking", "tome", "evit"))
    speed = " ".join(s for s in device_check.plan(tmp_path, smoke=False)[1]["argv"])
    assert "--variants baseline,patch-ranking,tome,evit" in speed  # a prtool without it: not asked for


def test_dry_listing_counts_what_travels(tmp_path):
    text = device_check_report.dry_listing(device_check.plan(tmp_path, smoke=False), ROOT, 450)
    assert "| speed_4x20_fp16 | 80 |" in text and "overall budget 450 s" in text
    tree = next(line for line in text.splitlines() if line.startswith("- working tree:"))
    mib = float(tree.split(",")[1].split()[0])
    assert 5 < mib < 64  # the testbed checkpoint alone is 16 MB
    assert "of 64 MiB: OK" in text


def test_a_step_past_its_time_box_is_killed_with_its_children(tmp_path):
    child = ("import subprocess, sys, time; "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    step = {"name": "sleepy", "argv": [sys.executable, "-c", child], "timeout": 1}
    t0 = time.perf_counter()
    with open(tmp_path / "log", "w") as log:
        rec = device_check.run_step(step, tmp_path, 2, log)
    assert rec["status"] == "timed out after 2 s" and time.perf_counter() - t0 < 20


def test_steps_past_the_budget_are_skipped_and_the_report_is_still_written(tmp_path):
    report = device_check.run_all(tmp_path / "out", tmp_path / "work", smoke=True, budget=1, only=["env", "accuracy"])
    assert [s["status"].split(":")[0] for s in report["steps"]] == ["skipped", "skipped"]
    assert json.loads((tmp_path / "out" / "device_check.json").read_text())["steps"][1]["name"] == "accuracy"
    assert "| accuracy | skipped" in (tmp_path / "out" / "device_check.md").read_text()


@pytest.mark.slow
def test_cpu_smoke_run_of_the_whole_script(tmp_path):
    """The same script, steps and reports as on the GPU machine, testbed-sized on the CPU."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(out), "--smoke",
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "device_check.log").read_text()
    report = json.loads((out / "device_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert all(s["status"] == "ok" for s in steps.values()), {n: s["status"] for n, s in steps.items()}
    speed = steps["speed_4x20_bf16"]["result"]["results"]
    assert {r["variant"] for r in speed if "p50_ms" in r} >= {"baseline", "patch-ranking", "tome", "evit"}
    acc = {(r["encoder"], r["precision"]) for r in steps["accuracy"]["result"]["rows"]}
    assert acc == {(e, p) for e in ("none", "patch-ranking", "tome", "evit") for p in ("fp32", "fp16", "bf16")}
    assert steps["compare_rankings"]["result"]["identical_rankings"] == 1.0  # CPU vs CPU in the smoke
    assert steps["train_cuda"]["result"]["images_per_second"] > 0
    assert "skipped" in steps["gpu_tests"]["summary"]  # no GPU here: the gpu tests are collected and skipped
    md = (out / "device_check.md").read_text()
    for section in ("## Speed", "## Accuracy", "## Phase I", "## Phase II"):
        assert section in md
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log", "device_check.md"]
