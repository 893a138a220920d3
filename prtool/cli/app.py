"""The ``prtool`` app. Commands import their heavy dependencies lazily, so ``--help`` is instant
and never needs onnxruntime-gpu, TensorRT or the network."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from prtool.cli import bench_cmd, demo_cmd, deploy_cmd, env_cmd, eval_cmd, export_cmd, rank_cmd, testbed_cmd, tune_cmd
from prtool.errors import PrtoolError

app = typer.Typer(
    name="prtool",
    help="Patch Ranking token pruning for CLIP: rank patches, train the predictor, export fixed-k ONNX, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from prtool import __version__

        print(f"prtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print prtool's version and exit.", is_eager=True,
                                                callback=_version)] = False) -> None:
    """Patch Ranking token pruning for CLIP: rank patches, train the predictor, export fixed-k ONNX, benchmark."""


app.command("export")(export_cmd.export)
app.command("inspect")(export_cmd.inspect)
app.command("rank")(rank_cmd.rank)
app.command("train")(rank_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command("show")(rank_cmd.show)
app.command("tune")(tune_cmd.tune)
app.command("export-text")(tune_cmd.export_text)
app.command("build")(deploy_cmd.build)
app.command("validate")(deploy_cmd.validate)
app.command("package")(deploy_cmd.package)
app.command("env")(env_cmd.env)
app.command("demo")(demo_cmd.demo)
app.add_typer(testbed_cmd.app, name="testbed")
from prtool.cli import avit_cmd  # noqa: E402  (A-ViT, #23: one self-contained block)

app.command("tune-avit")(avit_cmd.tune_avit)
app.command("avit-tokens")(avit_cmd.avit_tokens)
app.add_typer(bench_cmd.app, name="bench")

from prtool.cli import plan_cmd  # noqa: E402 - appended registration block

app.command("plan")(plan_cmd.plan)


def main() -> None:
    try:
        app()
    except PrtoolError as exc:
        print(f"prtool: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("prtool: interrupted", file=sys.stderr)
        sys.exit(130)
