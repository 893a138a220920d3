"""``prtool env``: what this machine offers (no network, no GPU required)."""

from __future__ import annotations

from prtool.cli import options as o
from prtool.cli.common import emit, setup, table


def env(as_json: o.Json = False, quiet: o.Quiet = False, verbose: o.Verbose = False):
    """Versions of torch, open_clip, onnx, onnxruntime (+ providers), polygraphy, TensorRT; CUDA."""
    setup(quiet, verbose)
    from prtool.runtime.envinfo import collect_env

    info = collect_env()
    emit(info, as_json, lambda i: table("prtool env", ["item", "value"],
                                        [(k, ", ".join(v) if isinstance(v, list)
                                          else ("not installed" if v is None else v))
                                         for k, v in i.items()]))
