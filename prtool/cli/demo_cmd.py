"""``prtool demo``: the main job on the embedded testbed (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_output, emit, setup, table


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("runs/demo"),
    limit: o.Limit = None,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="Batch size of the side-by-side timing.")] = 32,
    latency_iters: Annotated[int, typer.Option("--latency-iters",
                                               help="Timed iterations per variant (after 3 warm-up).")] = 20,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Export unpruned + pruned testbed encoders, validate, score in onnxruntime, time, report."""
    setup(quiet, verbose)
    check_output(out, "dir")
    from prtool.bench.demo import SUMMARY_COLUMNS, run_demo, summary_rows

    report = run_demo(out, limit=limit, latency_batch=latency_batch, latency_iters=latency_iters)

    def human(r):
        lat = r["latency"]
        # every row shares the schedule (in the title): the other columns fit 100 characters uncut
        keep = [i for i, c in enumerate(SUMMARY_COLUMNS) if c != "schedule"]
        table(f"prtool demo: testbed, {r['eval_images']} eval images, schedule {r['schedule']['string']}, onnxruntime "
              "CPU",
              ["variant", "tokens", "GFLOPs", "top-1 %", "top-5 %", "cos", "p50 ms", "speedup", "validated"],
              [[row[i] for i in keep] for row in summary_rows(r)])
        print(f"speedup {lat['speedup_p50']:.2f}x at batch {lat['batch']} (ideal FLOP ratio "
              f"{lat['ideal_flop_speedup']:.2f}x, measured/ideal {lat['measured_over_ideal']:.2f}); report in "
              f"{out}/report.md, pictures in {r['pictures']}")

    emit(report, as_json, human)
