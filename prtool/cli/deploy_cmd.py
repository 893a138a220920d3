"""``prtool build``, ``prtool validate`` and ``prtool package``: engines, checks against PyTorch, Triton."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prtool.cli import options as o
from prtool.cli.common import check_inputs, check_output, emit, failed_validation_shown, print_checks, setup, table
from prtool.deploy.build_request import BuildRequest
from prtool.util.recipes import options_from

Recipe = Annotated[Path | None, typer.Option(
    "--recipe", help="TOML recipe; its \\[build] table gives defaults for these options.")]


B = BuildRequest()  # the defaults: one place, the dataclass


def build(
    ctx: typer.Context,
    onnx: Annotated[Path, typer.Argument(help="The .onnx to build from (its manifest beside it is recorded).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Engine path (.plan); the manifest goes beside it as .plan.json. "
                            "Default: the ONNX path with .plan.")] = B.out,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="fp32, fp16, bf16, or best (TensorRT 10 weak typing: fp16+bf16, no int8). Default fp16; "
                            "on TensorRT 11 (or 10 --strongly-typed) fp16/bf16 build from a mixed-precision ONNX "
                            "prtool writes.")] = B.precision,
    min_batch: Annotated[int, typer.Option(
        "--min-batch", help="Smallest batch of the optimization profile.")] = B.min_batch,
    opt_batch: Annotated[int, typer.Option("--opt-batch", help="Batch TensorRT tunes for.")] = B.opt_batch,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Largest batch of the optimization profile.")] = B.max_batch,
    timing_cache: Annotated[Path | None, typer.Option(
        "--timing-cache", help="Timing cache file, read if present and updated.")] = B.timing_cache,
    strongly_typed: Annotated[bool, typer.Option(
        "--strongly-typed", help="TensorRT 10: strongly typed network (always so on 11); fp16/bf16 then come from "
                                 "the mixed-precision ONNX.")] = B.strongly_typed,
    trt_version: Annotated[int | None, typer.Option(
        "--trt-version", help="TensorRT major to build for: 11 or 10 (default: the installed one, else 11).")
    ] = B.trt_version,
    mixed_onnx_only: Annotated[bool, typer.Option(
        "--mixed-onnx-only", help="Write the mixed-precision ONNX TensorRT would build (fp16/bf16) and stop; "
                                  "no TensorRT needed.")] = B.mixed_onnx_only,
    no_fp32_norm: Annotated[bool, typer.Option(
        "--no-fp32-norm", help="Let LayerNorm/Softmax run in FP16/BF16 too (risks overflow).")] = B.no_fp32_norm,
    workspace: Annotated[int | None, typer.Option(
        "--workspace", help="Workspace memory pool limit in MiB (default: TensorRT's).")] = B.workspace,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Resolve and print the configuration and the trtexec command; build nothing "
                          "(no TensorRT needed).")] = B.dry_run,
    recipe: Recipe = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Build a TensorRT engine (+ manifest) from an exported ONNX file, or print its configuration."""
    req = options_from(BuildRequest, ctx, dict(locals()), recipe, "build")
    setup(quiet, verbose)
    from prtool.deploy.build_request import run_build

    if not req.dry_run:
        check_output(req.engine)
    _print_build(run_build(req), req.onnx, as_json, quiet)


def _print_build(result: dict, src: Path, as_json: bool, quiet: bool) -> None:
    """The result of a mixed-precision write, a dry run or a build: a line, a table or JSON."""
    if quiet and not as_json:
        print(result["mixed_onnx"] if "mixed_onnx" in result else result["trtexec"] if "dry_run" in result
              else result["engine"])
    elif "mixed_onnx" in result:
        emit(result, as_json, lambda r: print(
            f"wrote {r['mixed_onnx']} and {r['manifest']} ({r['type']}; {', '.join(r['fp32_op_types'])} and "
            f"{r['fp32_nodes']} scoring/index nodes in FP32; {r['converter']})"))
    elif "dry_run" in result:
        emit(result, as_json, lambda r: _print_dry_run(r, src))
    else:
        emit(result, as_json, lambda r: print(
            f"wrote {r['engine']} and {r['manifest']} (TensorRT {r['tensorrt']}, {r['gpu']['name']}, "
            f"{r['precision']}, batch {r['profile']['min'][0]}..{r['profile']['max'][0]}, {r['build_seconds']} s)"))


def _print_dry_run(r: dict, src: Path) -> None:
    c = r["config"]
    table(f"engine build for {src} (dry run)", ["setting", "value"], [
        ("engine", r["engine"]), ("TensorRT major", c["tensorrt_major"]), ("precision", c["precision"]),
        ("ONNX TensorRT parses", c["mixed_onnx"] or c["onnx"]),
        ("builder flags", ", ".join(c["builder_flags"]) or "-"),
        ("TF32", c["tf32"]), ("strongly typed", c["strongly_typed"]),
        ("LayerNorm/Softmax in FP32", c["fp32_norm"]), ("profile min", c["profile"]["min"]),
        ("profile opt", c["profile"]["opt"]), ("profile max", c["profile"]["max"]),
        ("workspace MiB", c["workspace_mib"]), ("timing cache", c["timing_cache"])])
    major = c["tensorrt_major"]
    print_checks(r["tensorrt_readiness"]["checks"], f"TensorRT {major} readiness (checked without TensorRT)")
    for note in c["notes"]:
        print(f"note: {note}")
    print("equivalent trtexec command:")
    print(r["trtexec"])


def validate(
    artifact: Annotated[Path, typer.Argument(help="An engine (.plan/.engine, run on TensorRT) or an .onnx file.")],
    provider: Annotated[str, typer.Option(
        "--provider", help="For .onnx: cpu, cuda or tensorrt (onnxruntime execution provider).")] = "cpu",
    precision: Annotated[str | None, typer.Option("--precision",
                                                  help="For .onnx: fp32, or fp16 with --provider tensorrt. Engines "
                                                       "use their manifest's.")] = None,
    pretrained: o.Pretrained = None,
    predictor: o.PredictorPath = None,
    tokens: Annotated[Path | None, typer.Option("--tokens",
                                                help="The tokens an export baked in, if not at the path its manifest "
                                                     "records.")] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", help="Folder of real images (default: shipped testbed eval images).")] = None,
    batch_size: o.BatchSize = 7,
    atol: Annotated[float | None, typer.Option("--atol",
                                               help="Override the precision preset's absolute tolerance.")] = None,
    rtol: Annotated[float | None, typer.Option("--rtol",
                                               help="Override the precision preset's relative tolerance.")] = None,
    min_cosine: Annotated[float | None, typer.Option("--min-cosine",
                                                     help="Override the preset's minimum cosine per image.")] = None,
    allow_failed_validation: Annotated[bool, typer.Option("--allow-failed-validation",
                                                          help="Exit 0 even if validation fails.")] = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Compare an engine or ONNX file with the PyTorch encoder rebuilt from its manifest, on real images."""
    setup(quiet, verbose)
    from prtool.deploy.verify import validate_artifact

    check_inputs(predictor, tokens)
    overrides = {k: val for k, val in (("atol", atol), ("rtol", rtol), ("min_cosine", min_cosine)) if val is not None}
    with failed_validation_shown(as_json):
        result = validate_artifact(artifact, provider, precision, pretrained, predictor, images, batch_size, overrides,
                                   tokens, allow_failed=allow_failed_validation)
    report = result["validation"]

    def human(r):
        print_checks(report["checks"],
                     f"{r['artifact']} on {r['backend']} vs PyTorch ({r['weights']}, {report['images']})")
        print(f"{'passed' if r['passed'] else 'FAILED'} ({r['precision']} tolerances: {report['tolerances']})")

    if as_json or not quiet:
        emit(result, as_json, human)
    elif result["passed"]:
        print(artifact)


def package(
    artifacts: Annotated[list[Path], typer.Argument(help="An .onnx and/or an engine (.plan), each with its manifest.")],
    triton: Annotated[Path, typer.Option("--triton", help="Triton model repository folder to write into.")],
    name: Annotated[str | None, typer.Option("--name",
                                             help="Model name (default: the file stem; _onnx/_trt appended when both "
                                                  "are given).")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch",
                                                  help="max_batch_size (default: the engine's profile max, or 32 for "
                                                       "ONNX).")] = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    verbose: o.Verbose = False,
):
    """Write a Triton model repository (config.pbtxt, 1/model.*, manifest, README) for the artifacts."""
    setup(quiet, verbose)
    check_output(triton, "dir", "--triton")
    from prtool.deploy.triton import package_triton

    models = package_triton(artifacts, triton, name, max_batch)
    if quiet and not as_json:
        for m in models:
            print(m["path"])
        return
    emit({"repository": str(triton), "models": models}, as_json, lambda r: table(
        f"Triton repository {r['repository']}", ["model", "platform", "max batch", "tensor", "dtype",
                                                 "dims (no batch)"],
        [row for m in r["models"] for row in _tensor_rows(m)]))


def _tensor_rows(m: dict) -> list[tuple]:
    """One row per input/output tensor; the model's own columns on its first row only."""
    tensors = [(f"in: {n}", d, dims) for n, d, dims in m["inputs"]] + [(f"out: {n}", d, dims) for n, d,
                                                                       dims in m["outputs"]]
    return [((m["name"], m["platform"], m["max_batch_size"]) if i == 0 else ("", "", "")) + (n, d, str(list(dims)))
            for i, (n, d, dims) in enumerate(tensors)]
