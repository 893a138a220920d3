"""Rank-and-merge design choices, measured side by side: merge target and proportional attention.

    PYTHONPATH=$PWD python benchmarks/rank_merge_designs.py --budgets 4x118,4x76 --batch 32

Every design is the predictor's ranking with dropped tokens merged; the rows differ in one choice:
``tokens`` (merge into the most similar kept token by cosine of the tokens, one-hot matmul,
explicit attention with a [B, 1, 1, T] bias), ``keys`` (similarity of the stage block's keys),
``fused`` (keep k - 1, fuse the rest into one token per stage), ``mask`` (tokens, with the
expanded [B*heads, T, T] float mask given to open_clip's blocks), ``sdpa`` (tokens, with
scaled_dot_product_attention and the [B, 1, 1, T] mask), ``scatter`` (tokens, the merge as
ScatterElements-add), ``no-prop-attn`` (tokens without proportional attention). Patch Ranking,
ToMe and the unpruned export run in the same interleaved timing. Writes
benchmarks/results/testbed-merge-designs-<env>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prtool.bench.pareto import bench_pareto, markdown_table, parse_budgets, plot_pareto
from prtool.data.datasets import load_dataset
from prtool.encoder.models import load_clip
from prtool.runtime.envinfo import collect_env, env_fingerprint
from prtool.testbed import spec as tbspec
from prtool.util.files import write_json_atomic

ROOT = Path(__file__).resolve().parent
DESIGNS = {
    "tokens": {"target": "tokens", "attention": "explicit", "merge_op": "onehot"},
    "keys": {"target": "keys", "attention": "explicit", "merge_op": "onehot"},
    "fused": {"target": "fused", "attention": "explicit", "merge_op": "onehot"},
    "mask": {"target": "tokens", "attention": "mask", "merge_op": "onehot"},
    "sdpa": {"target": "tokens", "attention": "sdpa", "merge_op": "onehot"},
    "scatter": {"target": "tokens", "attention": "explicit", "merge_op": "scatter"},
    "no-prop-attn": {"target": "tokens", "attention": "none", "merge_op": "onehot"},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4x118,4x76")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    loaded = load_clip("testbed", "default")
    dataset = load_dataset("testbed", "test").limit(args.limit)
    designs = {d: DESIGNS[d] for d in args.designs.split(",")}
    result = bench_pareto(loaded, dataset, parse_budgets(loaded, args.budgets), ["none", "patch-ranking", "tome"],
                          tbspec.PREDICTOR_PATH, batch=args.batch, iters=args.iters,
                          workdir=Path("runs") / "merge-designs", designs=designs)
    result["environment"] = collect_env()
    stem = args.out / f"testbed-merge-designs-{env_fingerprint()}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown_table(result))
    plot_pareto(result, stem.with_suffix(".png"))
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
