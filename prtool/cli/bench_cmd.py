"""``prtool bench accuracy``: methods at equal schedules, with reports and plots."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_inputs, check_output, check_schedule_syntax, dataset_note, emit, setup, table
from prtool.encoder.methods import help_names

app = typer.Typer(help="Benchmarks: accuracy of pruning methods at equal cost.", no_args_is_help=True)


@app.command("accuracy")
def accuracy(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Report folder (JSON, markdown, plot).")] = Path("runs/bench-accuracy"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: o.Split = "test",
    image_root: o.ImageRoot = None,
    schedule: Annotated[list[str] | None, typer.Option("--schedule", "-s", help="A schedule (repeatable).")] = None,
    keep_ratios: Annotated[str | None, typer.Option("--keep-ratios",
                                                    help="Comma-separated keep ratios, each with "
                                                         "--stages/--first-block.")] = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    methods: Annotated[str, typer.Option("--methods", help=f"Comma-separated: {help_names('accuracy')}.")
                       ] = "none,patch-ranking,random,cls-attn,evit,tome",
    predictor: o.PredictorPath = None,
    rankings: Annotated[Path | None, typer.Option("--rankings", "-r",
                                                  help="Rankings store of the evaluated split (for golden).")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds for random (comma-separated).")] = "0,1,2",
    limit: o.Limit = None,
    batch_size: o.BatchSize = 64,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="Also score each pruned method's ONNX in onnxruntime as fp32,int8-dynamic,int8-qdq,fp16 "
        "(comma list).")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Dataset calibrating int8-qdq.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images (int8-qdq).")] = 64,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Zero-shot accuracy, cosine to unpruned and GFLOPs of each method at the same schedules."""
    setup(quiet, verbose)
    quant = quantize_option(quantize, calib_data, calib_images, out)
    check_output(out, "dir")
    for s in schedule or []:
        check_schedule_syntax(s)
    check_inputs(predictor)
    from prtool.bench.accuracy import bench_accuracy, markdown_table, plot_accuracy_vs_flops
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import schedule_for
    from prtool.encoder.models import load_clip
    from prtool.errors import PrtoolError
    from prtool.runtime.envinfo import collect_env
    from prtool.util.reports import write_report

    loaded = load_clip(model, pretrained)
    dataset = load_dataset(data, split, image_root).limit(limit)
    scheds = [schedule_for(loaded, s) for s in (schedule or [])]
    if keep_ratios:
        try:
            ratios = [float(r) for r in keep_ratios.split(",")]
        except ValueError:
            raise PrtoolError(f"--keep-ratios {keep_ratios!r}: give comma-separated numbers such as 0.8,0.6") from None
        scheds += [schedule_for(loaded, keep_ratio=r, stages=stages, first_block=first_block) for r in ratios]
    if not scheds:
        raise PrtoolError("give at least one --schedule or --keep-ratios")
    result = bench_accuracy(loaded, dataset, scheds, [m.strip() for m in methods.split(",") if m.strip()],
                            predictor, rankings, [int(s) for s in seeds.split(",")], batch_size, quant)
    result["environment"] = collect_env()
    result.update(dataset_note(dataset))
    from prtool.bench.quantize_bench import quantized_markdown

    write_report(out, "accuracy", result, markdown_table(result) + quantized_markdown(result), plot_accuracy_vs_flops,
                 "accuracy_vs_gflops.png")
    emit(result, as_json, lambda r: _accuracy_table(r, out))


def _accuracy_table(r: dict, out: Path) -> None:
    """The accuracy rows in 100 columns (the full table, with top-5 and paired errors, is in accuracy.md)."""
    rows = [(x["method"], x["schedule"], f"{x['top1']:.2f}" + (f" ±{x['top1_stderr']:.2f}"
                                                               if x.get("top1_stderr") is not None else ""),
             x["mean_cosine"], x["top1_agreement"], x["gflops"],
             f"{x['paired_diff']:+.2f} ±{x['paired_se']:.2f}" if x.get("paired_vs") else None) for x in r["rows"]]
    table(f"zero-shot on {r['dataset']}/{r['split']} ({r['images']} images)",
          ["method", "schedule", "top-1 %", "cos", "agree %", "GFLOPs", "Δ top-1 vs PR"], rows)
    print(f"report in {out}/accuracy.md (with top-5 and paired errors), plot {out}/accuracy_vs_gflops.png")


@app.command("speed")
def speed(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Report folder (JSON, markdown, plot).")] = Path("runs/bench-speed"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    schedule: o.Schedule = None,
    keep_ratio: o.KeepRatio = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    predictor: o.PredictorPath = None,
    variants: Annotated[str, typer.Option("--variants", help=f"Comma-separated: {help_names('speed')}.")
                        ] = "baseline,patch-ranking,static,evit,tome",
    backends: Annotated[str, typer.Option(
        "--backends", help="Comma-separated: torch, onnxruntime (GPU: onnxruntime-cuda, tensorrt).")] = "onnxruntime",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8,32",
    warmup: Annotated[int, typer.Option("--warmup")] = 3,
    iters: Annotated[int, typer.Option("--iters", help="Timed interleaved iterations (>= 20 recommended).")] = 20,
    device: o.Device = "auto",
    precision: Annotated[str | None, typer.Option("--precision",
                                                  help="fp32, fp16 or bf16: the torch backend's autocast (default "
                                                       "fp32) and TensorRT's build (default fp16).")] = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs",
                                              help="Torch backend on CUDA: replay each variant as a captured CUDA "
                                                   "graph.")] = False,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Dataset calibrating NAME+int8-qdq "
                                                   "variants.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images (int8-qdq).")] = 64,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Latency (p50/p90/p99), images/s and speedup vs ideal FLOP ratio, all variants interleaved."""
    setup(quiet, verbose)
    check_output(out, "dir")
    check_schedule_syntax(schedule)
    check_inputs(predictor)
    from prtool.bench.speed import bench_speed, markdown_table
    from prtool.encoder.models import load_clip
    from prtool.runtime.envinfo import collect_env
    from prtool.util.reports import write_report

    loaded = load_clip(model, pretrained)
    out.mkdir(parents=True, exist_ok=True)
    result = bench_speed(loaded, schedule, keep_ratio, stages, first_block,
                         [v.strip() for v in variants.split(",") if v.strip()],
                         [b.strip() for b in backends.split(",") if b.strip()],
                         [int(b) for b in batch_sizes.split(",")], predictor, warmup, iters, workdir=out,
                         device=device, precision=precision, cuda_graphs=cuda_graphs,
                         calib={"data": calib_data, "images": calib_images, "seed": 0})
    result["environment"] = collect_env()
    write_report(out, "speed", result, markdown_table(result))
    for f in out.glob("*.onnx"):  # the exported variants were only needed for timing
        f.unlink()
        f.with_suffix(".json").unlink(missing_ok=True)
    for d in (d for d in out.glob("*+*") if d.is_dir()):  # quantized variants' folders
        shutil.rmtree(d)
    emit(result, as_json, lambda r: print(markdown_table(r) + f"\nreport in {out}/speed.md"))


@app.command("prompts")
def prompts(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("runs/bench-prompts"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    train_split: Annotated[str, typer.Option("--train-split")] = "train",
    test_split: Annotated[str, typer.Option("--test-split")] = "test",
    image_root: o.ImageRoot = None,
    schedule: o.Schedule = None,
    keep_ratio: o.KeepRatio = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    scorer: o.Scorer = "predictor",
    predictor: o.PredictorPath = None,
    shots: Annotated[int, typer.Option("--shots")] = 16,
    n_ctx: Annotated[int | None, typer.Option("--n-ctx",
                                              help="Default: 16, or what the text context has room for.")] = None,
    epochs: Annotated[int, typer.Option("--epochs")] = 30,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate of the tuned tokens.")] = 0.002,
    kg_weight: Annotated[float, typer.Option("--kg-weight", help="KgCoOp's lambda (0 = plain CoOp).")] = 8.0,
    seed: o.Seed = 0,
    limit: o.Limit = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """The paper's Table 5 rows: none, prune, T, T+prune, T+V, T+V+prune (with GFLOPs)."""
    setup(quiet, verbose)
    check_output(out, "dir")
    check_schedule_syntax(schedule)
    check_inputs(predictor)
    from prtool.bench.prompts import bench_prompts, markdown_table
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import schedule_for
    from prtool.encoder.models import load_clip
    from prtool.runtime.envinfo import collect_env
    from prtool.tuning.prompts import resolve_n_ctx
    from prtool.tuning.tune import TuneConfig
    from prtool.util.reports import write_report

    loaded = load_clip(model, pretrained)
    sched = schedule_for(loaded, schedule, keep_ratio, stages, first_block)
    train = load_dataset(data, train_split, image_root)
    n_ctx = resolve_n_ctx(n_ctx, loaded.model, loaded.tokenizer(), train.class_synonyms)
    cfg = TuneConfig(n_ctx=n_ctx, shots=shots, epochs=epochs, lr=lr, seed=seed, kg_weight=kg_weight)
    result = bench_prompts(loaded, train, load_dataset(data, test_split, image_root).limit(limit), sched, scorer,
                           predictor, cfg)
    result["tune_config"] = {"n_ctx": n_ctx, "shots": shots, "epochs": epochs, "seed": seed, "lr": cfg.lr,
                             "batch_size": cfg.batch_size, "kg_weight": kg_weight, "init": cfg.init}
    result["environment"] = collect_env()
    result.update(dataset_note(train))
    write_report(out, "prompts", result, markdown_table(result))
    emit(result, as_json, lambda r: print(markdown_table(r) + f"\nreport in {out}/prompts.md"))


@app.command("pareto")
def pareto(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Report folder (JSON, markdown, plot).")] = Path("runs/bench-pareto"),
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    data: o.Data = "testbed",
    split: o.Split = "test",
    image_root: o.ImageRoot = None,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated STAGESxKEEP (patches kept, or a % "
                                         "of them).")] = "4x136,4x118,4x96,4x76,4x56,1x60%,1x50%",
    first_block: o.FirstBlock = None,
    methods: Annotated[str, typer.Option("--methods", help=f"Comma-separated: {help_names('pareto')}; "
                                         "NAME+int8-dynamic|int8-qdq|fp16 adds that method's quantized export.")
                       ] = "none,patch-ranking,patch-ranking-merge,tome,evit,random-merge",
    predictor: o.PredictorPath = None,
    rankings: Annotated[Path | None, typer.Option("--rankings", "-r", help="Rankings store of the evaluated "
                                                  "split (for golden-merge).")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds for random-merge (comma-separated).")] = "0",
    limit: o.Limit = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch size of the latency runs.")] = 32,
    warmup: Annotated[int, typer.Option("--warmup")] = 3,
    iters: Annotated[int, typer.Option("--iters", help="Timed interleaved iterations (>= 20 recommended).")] = 20,
    combine: Annotated[str | None, typer.Option("--combine",
                                                help="Comma-separated pareto.json files of earlier runs (e.g. one per "
                                                     "budget): report them as one, measuring nothing.")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Dataset calibrating NAME+int8-qdq "
                                                   "methods.")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images (int8-qdq).")] = 64,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Top-1 (from the ONNX exports) vs measured speedup of each method over a grid of budgets, with the Pareto
    front."""
    setup(quiet, verbose)
    check_output(out, "dir")
    check_inputs(predictor)
    from prtool.bench import pareto as bp
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import resolve_predictor
    from prtool.encoder.models import load_clip
    from prtool.runtime.envinfo import collect_env
    from prtool.util.reports import write_report
    if combine:
        result = bp.combine_results([bp.load_report(Path(f.strip())) for f in combine.split(",") if f.strip()])
    else:
        loaded = load_clip(model, pretrained)
        dataset = load_dataset(data, split, image_root).limit(limit)
        scheds = bp.parse_budgets(loaded, budgets, first_block)
        if predictor is None:  # the shipped testbed predictor for the shipped checkpoint, else untrained (said)
            predictor = resolve_predictor(loaded, scheds[0], "predictor", None)
        result = bp.bench_pareto(loaded, dataset, scheds, [m.strip() for m in methods.split(",") if m.strip()],
                              predictor, rankings, [int(s) for s in seeds.split(",")], batch, warmup, iters,
                              workdir=out / "onnx", calib={"data": calib_data, "images": calib_images, "seed": 0})
        result["environment"] = collect_env()
        result.update(dataset_note(dataset))
    write_report(out, "pareto", result, bp.markdown_table(result), bp.plot_pareto)
    emit(result, as_json, lambda r: print(bp.markdown_table(r) + f"\nreport in {out}/pareto.md, plot {out}/pareto.png"))


def quantize_option(quantize: str | None, calib_data: str | None, calib_images: int, out: Path) -> dict | None:
    """``--quantize a,b`` checked (unknown mode, int8-qdq without --calib-data: one-line errors, before any work)."""
    if not quantize:
        return None
    from prtool.bench.quantize_bench import check_modes

    modes = [m.strip() for m in quantize.split(",") if m.strip()]
    check_modes(modes, calib_data)
    return {"modes": modes, "calib": {"data": calib_data, "images": calib_images, "seed": 0},
            "workdir": out / "onnx"}
