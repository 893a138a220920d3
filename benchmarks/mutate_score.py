"""Score of a `make mutate` run, from mutmut's own result files (mutants/**/*.py.meta).

    python benchmarks/mutate_score.py [GLOB ...] [--md OUT.md]

Counts the mutants whose names match the globs (all when none are given) by mutmut's status (killed, survived,
timeout, no tests, ...), per file and in total, and lists every survivor with mutmut's diff (`mutmut show NAME`).
Run from the repository root after `mutmut run`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "not checked")


def load_results(root: Path, globs: list[str]) -> dict[str, dict[str, str]]:
    """{source file: {mutant name: status}} for the mutants that match one of the globs."""
    found = {}
    for meta in sorted(root.glob("**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        picked = {name: status_by_exit_code[code] for name, code in codes.items()
                  if not globs or any(fnmatch.fnmatch(name, g) for g in globs)}
        if picked:
            found[str(meta.relative_to(root))[: -len(".meta")]] = picked
    return found


def score_table(results: dict[str, dict[str, str]]) -> tuple[list[str], Counter]:
    lines = ["| file | " + " | ".join(COLUMNS) + " | total | score |", "|---" * (len(COLUMNS) + 3) + "|"]
    total = Counter()
    for path, by_name in [*results.items(), ("all", None)]:
        counts = Counter(by_name.values()) if by_name is not None else total
        if by_name is not None:
            total.update(counts)
        n = sum(counts.values())
        score = counts["killed"] / n if n else 0.0
        lines.append(f"| {path} | " + " | ".join(str(counts[c]) for c in COLUMNS) + f" | {n} | {score:.1%} |")
    return lines, total


def survivor_diffs(results: dict[str, dict[str, str]]) -> list[str]:
    out = []
    for by_name in results.values():
        for name, status in sorted(by_name.items()):
            if status in ("survived", "no tests"):
                diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True)
                out += [f"### {name} ({status})", "```diff", diff.stdout.strip(), "```"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("globs", nargs="*", help="mutant name globs (MUTATE_SCOPE); all mutants when none")
    ap.add_argument("--md", type=Path, help="also write the table and the survivors' diffs to this markdown file")
    args = ap.parse_args()
    results = load_results(Path("mutants"), args.globs)
    if not results:
        print("no mutmut results under mutants/ for these globs: run `make mutate` first", file=sys.stderr)
        return 2
    table, total = score_table(results)
    print("\n".join(table))
    print(f"killed {total['killed']} / {sum(total.values())}; survivors: mutmut results (or --md)")
    if args.md:
        args.md.write_text("\n".join(table + ["", "## Survivors", ""] + survivor_diffs(results)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
