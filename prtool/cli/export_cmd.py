"""``prtool export`` and ``prtool inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_inputs, check_output, check_schedule_syntax, emit, print_checks, setup, table


def export(
    ctx: typer.Context,
    model: o.Model = "testbed",
    pretrained: o.Pretrained = None,
    schedule: o.Schedule = None,
    keep_ratio: o.KeepRatio = None,
    stages: o.Stages = 1,
    first_block: o.FirstBlock = None,
    scorer: o.Scorer = "predictor",
    predictor: o.PredictorPath = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .onnx path (the manifest goes beside it as .json).")] = Path("runs/export/model.onnx"),
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="torchscript or dynamo.")] = "torchscript",
    gather: Annotated[str, typer.Option("--gather", help="flat (Gather + offsets), elements (GatherElements) or nd (GatherND).")] = "flat",
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Do not L2-normalize image_embeds.")] = False,
    with_kept_indices: Annotated[bool, typer.Option("--with-kept-indices", help="Add the kept_patch_indices output.")] = False,
    no_prune: Annotated[bool, typer.Option("--no-prune", help="Export the unpruned baseline with the same I/O contract.")] = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip validation against PyTorch.")] = False,
    allow_failed_validation: Annotated[bool, typer.Option("--allow-failed-validation", help="Keep the files even if validation fails (exit 0).")] = False,
    images: Annotated[Path | None, typer.Option("--images", help="Folder of real images to validate on (default: shipped testbed eval images).")] = None,
    batch_size: o.BatchSize = 7,
    atol: Annotated[float | None, typer.Option("--atol", help="Absolute tolerance on image_embeds.")] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Relative tolerance on image_embeds.")] = None,
    tokens: Annotated[Path | None, typer.Option("--tokens", help="Learned tokens from `prtool tune`: visual tokens are baked in.")] = None,
    classifier: Annotated[bool, typer.Option("--classifier", help="Add a logits output (class text embeddings baked in; from --tokens or --data).")] = False,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset whose class names make a zero-shot --classifier head.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="TOML recipe with defaults for these options.")] = None,
    allow_other_weights: o.AllowOtherWeights = False,
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8-dynamic, int8-qdq (calibrated Q/DQ) or fp16; "
                                                 "the ranking/TopK/index path stays exact.")] = None,
    calib_data: Annotated[str | None, typer.Option("--calib-data", help="Dataset calibrating int8-qdq (its train "
                                                   "split).")] = None,
    calib_split: Annotated[str, typer.Option("--calib-split", help="Split of --calib-data.")] = "train",
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images (int8-qdq).")] = 64,
    calib_seed: Annotated[int, typer.Option("--calib-seed", help="Seed drawing the calibration images.")] = 0,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Export the pruned (or baseline) CLIP image encoder to ONNX, validated against PyTorch."""
    params = dict(locals())  # the options, before any local import joins the namespace
    setup(quiet, verbose)
    from prtool.build import EncoderSpec, resolve_predictor, schedule_for
    from prtool.errors import ValidationError
    from prtool.export import ExportOptions, export_onnx
    from prtool.models import load_clip
    from prtool.recipes import apply_recipe
    from prtool.validate import Tolerances

    values = apply_recipe(recipe, ctx, params, section="export")
    qopts = None
    if quantize is not None:
        from prtool.quantize import QuantizeOptions

        qopts = QuantizeOptions(quantize, calib_data, calib_split, calib_images, calib_seed)
        qopts.check()
    check_output(values["out"], suffixes=(".onnx",))
    check_schedule_syntax(values["schedule"])
    check_inputs(values["predictor"], tokens)
    loaded = load_clip(values["model"], values["pretrained"])
    if no_prune:
        sched = schedule_for(loaded, "none")
    else:
        sched = schedule_for(loaded, values["schedule"], values["keep_ratio"], values["stages"], values["first_block"])
    pred = resolve_predictor(loaded, sched, values["scorer"], values["predictor"])
    spec = EncoderSpec(sched, values["scorer"], pred, values["gather"], allow_other_weights=allow_other_weights)
    tol = Tolerances(**{k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None})
    opts = ExportOptions(opset=values["opset"], exporter=values["exporter"], normalize=not no_normalize,
                         with_kept_indices=with_kept_indices, validate=not no_validate,
                         allow_failed_validation=allow_failed_validation, images=images, batch_size=batch_size,
                         tolerances=tol)
    extras = {"visual_prompts": None, "class_embeds": None, "manifest": {}}
    if tokens is not None or classifier:
        from prtool.datasets import load_dataset
        from prtool.tune import export_extras

        extras = export_extras(loaded, spec, tokens, classifier, load_dataset(data, "test") if data else None, data)
    kw = {"visual_prompts": extras["visual_prompts"], "extra_manifest": extras["manifest"],
          "class_embeds": extras["class_embeds"]}
    try:
        if qopts is not None:
            from prtool.quantize import export_quantized

            result = export_quantized(loaded, spec, values["out"], opts, qopts, **kw)
        else:
            result = export_onnx(loaded, spec, values["out"], opts, **kw)
    except ValidationError as exc:
        if exc.report is not None and as_json:  # the report is the result, as `validate --json` prints it
            emit({"onnx": None, "manifest": None, "schedule": sched.to_string() or "none", "keep": list(sched.keep),
                  "passed": False, "validation": exc.report.to_dict()}, True)
        elif exc.report is not None:
            print_checks(exc.report.checks, "export validation", stderr=True)
        raise
    summary = {"onnx": str(result.onnx_path), "manifest": str(result.manifest_path),
               "schedule": sched.to_string() or "none", "keep": list(sched.keep),
               "predictor": result.manifest["predictor"], "quantization": result.manifest.get("quantization"),
               "validation": result.report.to_dict() if result.report else None}
    if quiet and not as_json:
        print(result.onnx_path)
        return

    def human(s):
        if result.report is not None:
            print_checks(result.report.checks, f"validation on {result.report.images}")
        q = f", {s['quantization']['mode']}" if s["quantization"] else ""
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
    from prtool.onnx_graph import inspect_onnx

    info = inspect_onnx(path)

    def human(i):
        table(f"{i['path']} (opset {i['opset']}, IR {i['ir_version']}, {i['num_nodes']} nodes)",
              ["io", "name", "dtype", "shape"],
              [("in", v["name"], v["dtype"], v["shape"]) for v in i["inputs"]]
              + [("out", v["name"], v["dtype"], v["shape"]) for v in i["outputs"]])
        table("TopK nodes", ["name", "K", "constant", "sorted"], [(t["name"], t["k"], t["constant_k"], t["sorted"]) for t in i["topk"]])
        table("ops", ["op", "count"], list(i["op_histogram"].items()))
        r = i["tensorrt_readiness"]
        print_checks(r["checks"], f"TensorRT 10 readiness: {r['verdict']} (checked without TensorRT)")
        m = i["manifest"]
        if m:
            print(f"manifest: source {m['source']}, schedule {m['schedule']['string'] or 'none'}, scorer {m.get('scorer')}, "
                  f"preprocess {m['preprocess']['image_size']} mean {m['preprocess']['mean']}")
            if m.get("quantization"):
                from prtool.quantize import describe

                print(describe(m["quantization"]))
        else:
            print("manifest: none beside the file")

    emit(info, as_json, human)
