"""Benchmark suites refuse unknown keys; reports are written whole (JSON, markdown, plot) or not at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prtool.bench.suites import read_suite
from prtool.errors import PrtoolError
from prtool.util.reports import write_report

ROOT = Path(__file__).parents[1]
SUITES = sorted((ROOT / "benchmarks" / "suites").glob("*.toml"))


def test_shipped_suites_read():
    assert {p.stem for p in SUITES} >= {"testbed", "vitb16-cpu"}
    testbed = read_suite(ROOT / "benchmarks" / "suites" / "testbed.toml")
    assert testbed.accuracy.keep_ratios == [0.6] and testbed.accuracy.first_block == 1
    assert [r.iters for r in testbed.all_speed_runs] == [20]
    vitb16 = read_suite(ROOT / "benchmarks" / "suites" / "vitb16-cpu.toml")
    assert vitb16.accuracy is None and [r.label for r in vitb16.all_speed_runs] == ["3x78", "4x20"]


GOOD = 'name = "t"\nmodel = "testbed"\n[speed]\nvariants = ["baseline"]\nbackends = ["torch"]\nbatch_sizes = [1]\n'


@pytest.mark.parametrize("text, fragment", [
    ('modle = "x"\n' + GOOD, "suite {p} has unknown keys ['modle']"),
    (GOOD + "iter = 50\n", "suite {p} [speed] has unknown keys ['iter']"),
    (GOOD + '[accuracy]\ndata = "testbed"\nmethods = ["none"]\nseed = [1]\n', "[accuracy] has unknown keys ['seed']"),
    (GOOD + '[[speed_runs]]\nvariants = []\nbackends = []\nbatch_sizes = []\nlabl = "a"\n',
     "[[speed_runs]] #1 has unknown keys ['labl']"),
    ('name = "t"\nmodel = "testbed"\n[speed]\nvariants = ["baseline"]\n', "lacks the keys ['backends', 'batch_sizes']"),
])
def test_unknown_or_missing_suite_keys_are_refused(tmp_path, text, fragment):
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(PrtoolError) as exc:
        read_suite(p)
    assert fragment.format(p=p) in str(exc.value)


def test_run_suite_prints_one_line_error(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(GOOD + "iter = 50\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_suite.py"), str(p), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "unknown keys ['iter']" in lines[0], proc.stderr
    assert [f.name for f in tmp_path.iterdir()] == ["s.toml"]


def test_write_report_writes_all_three_or_nothing_half_written(tmp_path):
    def plot(result, path):
        assert path.suffix == ".png" and path.parent == tmp_path / "r"
        path.write_bytes(b"png:" + json.dumps(result).encode())

    paths = write_report(tmp_path / "r", "speed", {"a": 1}, "# md\n", plot)
    assert json.loads(paths["json"].read_text()) == {"a": 1} and paths["markdown"].read_text() == "# md\n"
    assert paths["plot"] == tmp_path / "r" / "speed.png" and paths["plot"].read_bytes() == b'png:{"a": 1}'
    assert write_report(tmp_path / "q", "x", {}, "", None, "p.png") == {"json": tmp_path / "q" / "x.json",
                                                                         "markdown": tmp_path / "q" / "x.md"}

    def broken(result, path):
        path.write_bytes(b"half")
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError):
        write_report(tmp_path / "r", "speed", {"a": 2}, "# md\n", broken)
    assert sorted(f.name for f in (tmp_path / "r").iterdir()) == ["speed.json", "speed.md", "speed.png"]
    assert paths["plot"].read_bytes() == b'png:{"a": 1}'  # the old plot stays whole, no temporary file is left
