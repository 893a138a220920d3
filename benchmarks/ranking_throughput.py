"""Golden-ranking throughput: variants batched (the default) vs one variant at a time, in one run.

    python benchmarks/ranking_throughput.py --images 20 --stride 2

Writes benchmarks/results/ranking-throughput-<env>.{json,md}. Both modes rank the same images
with the same model, alternating image by image, so machine noise hits both alike; the rankings
are checked to be identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from prtool.data.datasets import load_dataset
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.models import load_clip
from prtool.ranking.golden import GoldenRanker, RankConfig
from prtool.runtime.envinfo import collect_env, env_fingerprint
from prtool.util.files import write_json_atomic

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--rank-block", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    loaded = load_clip(args.model, "default" if args.model == "testbed" else "none")
    enc, _ = build_pruned_encoder(loaded, EncoderSpec(schedule_for(loaded, "none")), normalize=False)
    cfg = RankConfig(args.rank_block, stride=args.stride, batch_size=args.batch_size)
    rankers = {"batched": GoldenRanker(enc, cfg), "one-at-a-time": GoldenRanker(enc, cfg, batched=False)}
    data = load_dataset("testbed", "test").limit(args.images)
    seconds = {k: 0.0 for k in rankers}
    same = True
    for i in range(len(data)):
        pixels, labels, _ = data.load([i], loaded.preprocess)
        out = {}
        for name in (list(rankers) if i % 2 == 0 else list(rankers)[::-1]):
            t0 = time.perf_counter()
            out[name] = rankers[name].rank(pixels, int(labels[0]))[0]
            seconds[name] += time.perf_counter() - t0
        same &= bool(np.array_equal(out["batched"], out["one-at-a-time"]))
    ips = {k: len(data) / v for k, v in seconds.items()}
    res = {"model": loaded.model_id, "images": len(data), "variants": len(rankers["batched"].windows),
           "stride": args.stride, "rank_block": args.rank_block, "variant_batch": args.batch_size,
           "images_per_s": ips, "speedup_batched": ips["batched"] / ips["one-at-a-time"],
           "identical_rankings": same, "environment": collect_env()}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"ranking-throughput-{env_fingerprint()}"
    write_json_atomic(args.out / f"{tag}.json", res)
    md = (f"Golden ranking throughput, {args.model}, {res['variants']} variants per image (stride {args.stride}), "
          f"rank block {args.rank_block}, {len(data)} images alternating modes:\n\n"
          f"| mode | images/s |\n|---|---|\n| batched ({args.batch_size} variants per pass) | {ips['batched']:.2f} |\n"
          f"| one variant at a time | {ips['one-at-a-time']:.2f} |\n\nbatched / one-at-a-time: "
          f"{res['speedup_batched']:.2f}x; identical rankings: {same}\n")
    (args.out / f"{tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
