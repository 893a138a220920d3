"""Run a benchmark suite (TOML) and write its results under benchmarks/results/, the file names
carrying the suite and the environment: ``python benchmarks/run_suite.py benchmarks/suites/testbed.toml``.
A suite's keys are the fields of ``prtool.bench.suites`` (unknown keys are refused)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prtool.bench.accuracy import bench_accuracy, plot_accuracy_vs_flops
from prtool.bench.accuracy import markdown_table as accuracy_md
from prtool.bench.speed import bench_speed
from prtool.bench.speed import markdown_table as speed_md
from prtool.bench.suites import AccuracyRun, SpeedRun, read_suite
from prtool.data.datasets import load_dataset
from prtool.encoder.build import schedule_for
from prtool.encoder.models import load_clip
from prtool.errors import PrtoolError
from prtool.runtime.envinfo import collect_env, env_fingerprint
from prtool.util.reports import write_report

ROOT = Path(__file__).resolve().parent


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def _accuracy(loaded, cfg: AccuracyRun, out: Path, tag: str) -> str:
    dataset = load_dataset(cfg.data, cfg.split).limit(cfg.limit)
    scheds = [schedule_for(loaded, s) for s in cfg.schedules]
    scheds += [schedule_for(loaded, keep_ratio=r, stages=cfg.stages, first_block=cfg.first_block)
               for r in cfg.keep_ratios]
    res = bench_accuracy(loaded, dataset, scheds, cfg.methods, _path(cfg.predictor), _path(cfg.rankings), cfg.seeds)
    res["environment"] = collect_env()
    md = accuracy_md(res)
    write_report(out, tag, res, md, plot_accuracy_vs_flops)
    return md


def _speed(loaded, cfg: SpeedRun, out: Path, tag: str) -> str:
    res = bench_speed(loaded, cfg.schedule, cfg.keep_ratio, cfg.stages, cfg.first_block, cfg.variants, cfg.backends,
                      cfg.batch_sizes, _path(cfg.predictor), cfg.warmup, cfg.iters, workdir=Path("runs") / "bench-work")
    res["environment"] = collect_env()
    md = speed_md(res)
    write_report(out, tag, res, md)
    return md


def run_suite(path: Path, out: Path, only: str | None = None) -> None:
    suite = read_suite(path)
    env = env_fingerprint()
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_clip(suite.model, suite.pretrained or ("default" if suite.model == "testbed" else "none"))
    if suite.accuracy and only in (None, "accuracy"):
        print(_accuracy(loaded, suite.accuracy, out, f"{suite.name}-accuracy-{env}"))
    if only in (None, "speed"):
        runs = suite.all_speed_runs
        for i, cfg in enumerate(runs):
            # a run's `label` names its result files
            label = cfg.label if cfg.label is not None else ("" if len(runs) == 1 else str(i))
            print(_speed(loaded, cfg, out, f"{suite.name}-speed{f'-{label}' if label else ''}-{env}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("suite", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--only", choices=["accuracy", "speed"], default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run_suite(args.suite, args.out, args.only)
    except PrtoolError as exc:
        print(f"run_suite: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
