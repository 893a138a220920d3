"""``prtool export`` and ``prtool inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import (
    check_inputs,
    check_output,
    check_schedule_syntax,
    emit,
    failed_validation_shown,
    print_checks,
    setup,
    table,
)
from prtool.export.request import ExportRequest
from prtool.util.recipes import options_from

Opt = typer.Option
Out = Annotated[Path, Opt("--out", "-o", help="Output .onnx path (the manifest goes beside it as .json).")]
Opset = Annotated[int, Opt("--opset", help="ONNX opset (>= 17).")]
Exporter = Annotated[str, Opt("--exporter", help="torchscript or dynamo.")]
Gather = Annotated[str, Opt("--gather", help="flat (Gather + offsets), elements (GatherElements) or nd (GatherND).")]
NoNormalize = Annotated[bool, Opt("--no-normalize", help="Do not L2-normalize image_embeds.")]
WithKeptIndices = Annotated[bool, Opt("--with-kept-indices", help="Add the kept_patch_indices output.")]
NoPrune = Annotated[bool, Opt("--no-prune", help="Export the unpruned baseline with the same I/O contract.")]
NoValidate = Annotated[bool, Opt("--no-validate", help="Skip validation against PyTorch.")]
AllowFailedValidation = Annotated[bool, Opt(
    "--allow-failed-validation", help="Keep the files even if validation fails (exit 0).")]
Images = Annotated[Path | None, Opt(
    "--images", help="Folder of real images to validate on (default: shipped testbed eval images).")]
Atol = Annotated[float | None, Opt("--atol", help="Absolute tolerance on image_embeds.")]
Rtol = Annotated[float | None, Opt("--rtol", help="Relative tolerance on image_embeds.")]
Tokens = Annotated[Path | None, Opt("--tokens", help="Learned tokens from `prtool tune`: visual tokens are baked in.")]
Classifier = Annotated[bool, Opt(
    "--classifier", help="Add a logits output (class text embeddings baked in; from --tokens or --data).")]
Data = Annotated[str | None, Opt("--data", "-d", help="Dataset whose class names make a zero-shot --classifier head.")]
Recipe = Annotated[Path | None, Opt(
    "--recipe", help="TOML recipe; its \\[export] table gives defaults for these options.")]
Quantize = Annotated[str | None, Opt("--quantize", help="int8-dynamic, int8-qdq (calibrated Q/DQ) or fp16; the "
                                                       "ranking/TopK/index path stays exact.")]
CalibData = Annotated[str | None, Opt("--calib-data", help="Dataset calibrating int8-qdq (its train split).")]
CalibSplit = Annotated[str, Opt("--calib-split", help="Split of --calib-data.")]
CalibImages = Annotated[int, Opt("--calib-images", help="Calibration images (int8-qdq).")]
CalibSeed = Annotated[int, Opt("--calib-seed", help="Seed drawing the calibration images.")]

D = ExportRequest()  # the defaults: one place, the dataclass


def export(
    ctx: typer.Context,
    model: o.Model = D.model,
    pretrained: o.Pretrained = D.pretrained,
    schedule: o.Schedule = D.schedule,
    keep_ratio: o.KeepRatio = D.keep_ratio,
    stages: o.Stages = D.stages,
    first_block: o.FirstBlock = D.first_block,
    scorer: o.Scorer = D.scorer,
    predictor: o.PredictorPath = D.predictor,
    out: Out = D.out,
    opset: Opset = D.opset,
    exporter: Exporter = D.exporter,
    gather: Gather = D.gather,
    no_normalize: NoNormalize = D.no_normalize,
    with_kept_indices: WithKeptIndices = D.with_kept_indices,
    no_prune: NoPrune = D.no_prune,
    no_validate: NoValidate = D.no_validate,
    allow_failed_validation: AllowFailedValidation = D.allow_failed_validation,
    images: Images = D.images,
    batch_size: o.BatchSize = D.batch_size,
    atol: Atol = D.atol,
    rtol: Rtol = D.rtol,
    tokens: Tokens = D.tokens,
    classifier: Classifier = D.classifier,
    data: Data = D.data,
    recipe: Recipe = None,
    allow_other_weights: o.AllowOtherWeights = D.allow_other_weights,
    quantize: Quantize = D.quantize,
    calib_data: CalibData = D.calib_data,
    calib_split: CalibSplit = D.calib_split,
    calib_images: CalibImages = D.calib_images,
    calib_seed: CalibSeed = D.calib_seed,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Export the pruned (or baseline) CLIP image encoder to ONNX, validated against PyTorch."""
    req = options_from(ExportRequest, ctx, dict(locals()), recipe, "export")
    setup(quiet, verbose)
    from prtool.export.request import run_export

    req.check_quantize()
    check_output(req.out, suffixes=(".onnx",))
    check_schedule_syntax(req.schedule)
    check_inputs(req.predictor, req.tokens)
    with failed_validation_shown(as_json):
        summary, report = run_export(req)
    _print_export(summary, report, as_json, quiet)


def _print_export(summary: dict, report, as_json: bool, quiet: bool) -> None:
    if quiet and not as_json:
        print(summary["onnx"])
        return

    def human(s):
        if report is not None:
            print_checks(report.checks, f"validation on {report.images}")
        q = f", {s['quantization']['mode']}" if s.get("quantization") else ""
        print(f"wrote {s['onnx']} and {s['manifest']} (schedule {s['schedule']}, keep {s['keep']}{q})")

    emit(summary, as_json, human)


def inspect(
    path: Annotated[Path, typer.Argument(help="An .onnx file.")],
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Inputs/outputs, opset, op histogram, TopK nodes, dynamic axes, manifest, TensorRT readiness."""
    setup(quiet, verbose)
    from prtool.export.onnx_graph import inspect_onnx

    info = inspect_onnx(path)

    def human(i):
        table(f"{i['path']} (opset {i['opset']}, IR {i['ir_version']}, {i['num_nodes']} nodes)",
              ["io", "name", "dtype", "shape"],
              [("in", v["name"], v["dtype"], v["shape"]) for v in i["inputs"]]
              + [("out", v["name"], v["dtype"], v["shape"]) for v in i["outputs"]])
        table("TopK nodes", ["name", "K", "constant", "sorted"],
              [(t["name"], t["k"], t["constant_k"], t["sorted"]) for t in i["topk"]])
        table("ops", ["op", "count"], list(i["op_histogram"].items()))
        r = i["tensorrt_readiness"]
        print_checks(r["checks"], f"TensorRT 10 readiness: {r['verdict']} (checked without TensorRT)")
        m = i["manifest"]
        if m:
            print(f"manifest: source {m['source']}, schedule {m['schedule']['string'] or 'none'}, scorer "
                  f"{m.get('scorer')}, preprocess {m['preprocess']['image_size']} mean {m['preprocess']['mean']}")
            if m.get("quantization"):
                from prtool.export.quantize import describe

                print(describe(m["quantization"]))
        else:
            print("manifest: none beside the file")

    emit(info, as_json, human)
