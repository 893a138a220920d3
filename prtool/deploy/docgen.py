"""Thin command-line entry points of the documentation generators (the work is library functions):

    python -m prtool.deploy.compat --out export/compat          -> compat.generate_compat
    python -m prtool.deploy.contract --update export/CONTRACT.md -> contract.generate_contract

Each parses its flags, calls the one library function, prints what it wrote, and reports a
:class:`~prtool.errors.PrtoolError` as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from prtool.errors import PrtoolError


def _run(call) -> int:
    try:
        for line in call():
            print(line)
    except PrtoolError as exc:
        print(f"prtool: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def compat_main(argv: list[str] | None = None) -> int:
    from prtool.deploy.compat import RUNTIMES, generate_compat

    ap = argparse.ArgumentParser(prog="python -m prtool.deploy.compat",
                                 description="The runtime x export-variant compatibility matrix, measured.")
    ap.add_argument("--out", type=Path, default=Path("export/compat"), help="folder for compat.json and COMPAT.md")
    ap.add_argument("--model", default="testbed", help="model to export (default: the testbed, 196 patches)")
    ap.add_argument("--pretrained", default="none", help="weights (default: seeded random weights)")
    ap.add_argument("--keep-ratio", type=float, default=0.6, help="pruned variants keep this fraction of patches")
    ap.add_argument("--stages", type=int, default=4, help="pruning stages of the pruned variants")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated subset of {','.join(RUNTIMES)}")
    ap.add_argument("--batch", type=int, default=2, help="images per run (>= 2 exercises batching)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    command = shlex.join(["python", "-m", "prtool.deploy.compat", *(sys.argv[1:] if argv is None else argv)])
    runtimes = tuple(r for r in args.runtimes.split(",") if r)
    return _run(lambda: generate_compat(args.out, args.model, args.pretrained, args.keep_ratio, args.stages,
                                        runtimes, args.batch, args.seed, command))


def contract_main(argv: list[str] | None = None) -> int:
    from prtool.deploy.contract import generate_contract

    ap = argparse.ArgumentParser(prog="python -m prtool.deploy.contract",
                                 description="The worked numeric example of export/CONTRACT.md.")
    ap.add_argument("--update", type=Path, help="rewrite the worked example in this file (export/CONTRACT.md)")
    ap.add_argument("--pretrained", help="testbed weights (default: the committed checkpoint, else seeded random)")
    args = ap.parse_args(argv)

    def call():
        ex = generate_contract(args.update, args.pretrained)
        return [args.update] if args.update else [json.dumps(ex, indent=2)]

    return _run(call)
