"""Run a benchmark suite (TOML) and write its results under benchmarks/results/, the file names
carrying the suite and the environment: ``python benchmarks/run_suite.py benchmarks/suites/testbed.toml``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prtool.bench_accuracy import bench_accuracy, plot_accuracy_vs_flops
from prtool.bench_accuracy import markdown_table as accuracy_md
from prtool.bench_speed import bench_speed
from prtool.bench_speed import markdown_table as speed_md
from prtool.build import schedule_for
from prtool.datasets import load_dataset
from prtool.envinfo import collect_env, env_fingerprint
from prtool.manifest import write_json_atomic
from prtool.models import load_clip
from prtool.recipes import tomllib

ROOT = Path(__file__).resolve().parent


def _speed(loaded, cfg: dict, out: Path, tag: str) -> str:
    res = bench_speed(loaded, cfg.get("schedule"), cfg.get("keep_ratio"), cfg.get("stages", 1), cfg.get("first_block"),
                      cfg["variants"], cfg["backends"], cfg["batch_sizes"],
                      Path(cfg["predictor"]) if cfg.get("predictor") else None, cfg.get("warmup", 3), cfg.get("iters", 20),
                      workdir=Path("runs") / "bench-work")
    res["environment"] = collect_env()
    write_json_atomic(out / f"{tag}.json", res)
    md = speed_md(res)
    (out / f"{tag}.md").write_text(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("suite", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--only", choices=["accuracy", "speed"], default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    suite = tomllib.loads(args.suite.read_text())
    env = env_fingerprint()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_clip(suite["model"], suite.get("pretrained", "default" if suite["model"] == "testbed" else "none"))
    if "accuracy" in suite and args.only in (None, "accuracy"):
        cfg = suite["accuracy"]
        dataset = load_dataset(cfg["data"], cfg.get("split", "test")).limit(cfg.get("limit"))
        scheds = [schedule_for(loaded, s) for s in cfg.get("schedules", [])]
        scheds += [schedule_for(loaded, keep_ratio=r, stages=cfg.get("stages", 1), first_block=cfg.get("first_block"))
                   for r in cfg.get("keep_ratios", [])]
        res = bench_accuracy(loaded, dataset, scheds, cfg["methods"], Path(cfg["predictor"]) if cfg.get("predictor") else None,
                             Path(cfg["rankings"]) if cfg.get("rankings") else None, cfg.get("seeds", [0, 1, 2]))
        res["environment"] = collect_env()
        tag = f"{suite['name']}-accuracy-{env}"
        write_json_atomic(args.out / f"{tag}.json", res)
        (args.out / f"{tag}.md").write_text(accuracy_md(res))
        plot_accuracy_vs_flops(res, args.out / f"{tag}.png")
        print(accuracy_md(res))
    if args.only in (None, "speed"):
        runs = ([suite["speed"]] if "speed" in suite else []) + suite.get("speed_runs", [])
        for i, cfg in enumerate(runs):
            label = cfg.get("label", "" if len(runs) == 1 else str(i))  # a run's `label` names its result files
            tag = f"{suite['name']}-speed{f'-{label}' if label else ''}-{env}"
            print(_speed(loaded, cfg, args.out, tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
