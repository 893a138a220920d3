"""device_check's report (JSON + markdown, rewritten after every step) and its dry listing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

CARRY_LIMIT = 64 * 2**20  # the device tool's limit on the working tree + carried paths
WHEELS_LIST = Path(__file__).with_name("device_wheels.txt")


def write(out: Path, report: dict) -> None:
    for name, text in (("device_check.json", json.dumps(report, indent=1, default=str)),
                       ("device_check.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def _steps(report: dict) -> dict:
    return {s["name"]: s for s in report["steps"]}


def markdown(report: dict) -> str:
    steps = _steps(report)
    lines = [f"# prtool device check ({report['mode']})", ""]
    env = (steps.get("env") or {}).get("result") or {}
    if env:
        gpu = env.get("gpu") or {}
        lines += [f"GPU: {gpu.get('name', 'none')} (cc {gpu.get('capability', '-')}, {gpu.get('memory_gib', '-')} "
                  f"GiB); nvidia-smi: {env.get('nvidia_smi') or '-'}; torch {env.get('torch')} (CUDA "
                  f"{env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); Python {env.get('python')}.", ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s.get('seconds', '-')} |" for s in report["steps"]]
    if "gpu_tests" in steps and steps["gpu_tests"].get("summary"):
        lines += ["", f"gpu-marked tests (no TensorRT): `{steps['gpu_tests']['summary']}`"]
    lines += _speed_section(steps) + _accuracy_section(steps) + _phase_section(steps)
    return "\n".join(lines) + "\n"


def _speed_section(steps: dict) -> list[str]:
    runs = {n: s["result"] for n, s in steps.items() if n.startswith("speed_") and s.get("result")}
    if not runs:
        return []
    batches = sorted({r["batch"] for res in runs.values() for r in res["results"] if "p50_ms" in r})
    head = ["run", "variant", "ideal"] + [f"b{b} speedup (m/i)" for b in batches]
    lines = ["", "## Speed: torch backend, measured speedup over unpruned (measured/ideal)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in runs.items():
        rows = [r for r in res["results"] if "p50_ms" in r]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            cells, ideal = [], "-"
            for b in batches:
                r = next((r for r in rows if r["variant"] == variant and r["batch"] == b), None)
                cells.append(f"{r['speedup']:.2f} ({r['measured_over_ideal']:.2f})" if r else "-")
                ideal = f"{r['ideal_speedup']:.2f}" if r else ideal
            lines.append("| " + " | ".join([name.removeprefix("speed_"), variant, ideal, *cells]) + " |")
    from prtool.bench.speed import markdown_table

    for name, res in runs.items():
        lines += ["", f"### {name}", "", markdown_table(res)]
    return lines


def _accuracy_section(steps: dict) -> list[str]:
    res = (steps.get("accuracy") or {}).get("result")
    if not res:
        return []
    from prtool.bench.precision_drift import markdown_table

    return ["", "## Accuracy in fp32 / fp16 / bf16 (testbed, zero-shot)", "", markdown_table(res)]


def _phase_section(steps: dict) -> list[str]:
    lines = []
    rows = []
    for name in ("rank_cuda", "rank_cpu"):
        r = (steps.get(name) or {}).get("result")
        if r:
            rows.append(f"| {name} | {r['images']} | {r['seconds']} | {r['images_per_second']:.1f} |")
    if rows:
        lines += ["", "## Phase I: golden rankings (testbed train split)", "", "| run | images | seconds | img/s |",
                  "|---|---|---|---|", *rows]
    cmp_ = (steps.get("compare_rankings") or {}).get("result")
    if cmp_:
        lines += ["", "CUDA vs CPU rankings of the same images: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                                          else f"{k} {v}" for k, v in cmp_.items())]
    rows = []
    for name in ("train_cuda", "train_cpu"):
        r = (steps.get(name) or {}).get("result")
        if r:
            vm = r.get("val_metrics", {})
            rows.append(f"| {name} | {r.get('seconds')} | {r.get('images_per_second', 0):.0f} | "
                        f"{vm.get('spearman', float('nan')):.3f} | " + ", ".join(f"{k} {v:.3f}" for k, v in vm.items()
                                                                             if k.startswith("match@")) + " |")
    if rows:
        lines += ["", "## Phase II: predictor training on those rankings", "",
                  "| run | seconds | img/s (images x epochs) | val Spearman | val match@k |", "|---|---|---|---|---|",
                  *rows]
    return lines


# ---- dry listing ----

def wanted_wheels() -> list[str]:
    return [ln.split("#")[0].strip() for ln in WHEELS_LIST.read_text().splitlines() if ln.split("#")[0].strip()]


def travelling_files(root: Path) -> list[tuple[str, int]]:
    """Tracked and untracked-not-ignored files (what the device tool sends), plus ``.whl/``."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    files = [(n, (root / n).stat().st_size) for n in names if n and (root / n).is_file()]
    whl = root / ".whl"
    if whl.is_dir():
        files += [(f".whl/{p.name}", p.stat().st_size) for p in sorted(whl.iterdir()) if p.is_file()]
    return files


def dry_listing(steps: list[dict], root: Path, budget: float) -> str:
    lines = [f"# device_check plan: {len(steps)} steps, time boxes sum to {sum(s['timeout'] for s in steps)} s "
             f"(overall budget {budget:.0f} s: steps past it are skipped)", "", "| step | time box s | command |",
             "|---|---|---|"]
    lines += [f"| {s['name']} | {s['timeout']} | "
              f"`{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(s['argv']))}` |"
              for s in steps]
    files = travelling_files(root)
    wheels = [(n, s) for n, s in files if n.startswith(".whl/")]
    tree = sum(s for n, s in files if not n.startswith(".whl/"))
    total = tree + sum(s for _, s in wheels)
    lines += ["", "## What travels (device tool: working tree + carried `.whl`, 64 MiB at most)", "",
              f"- working tree: {len(files) - len(wheels)} files, {tree / 2**20:.2f} MiB"]
    lines += [f"- `{n}`: {s / 2**20:.2f} MiB" for n, s in wheels]
    have = {n.removeprefix(".whl/").split("-")[0].lower().replace("_", "-") for n, _ in wheels}
    missing = [w for w in wanted_wheels() if w.split("==")[0].lower().replace("_", "-") not in have]
    if missing:
        lines.append(f"- MISSING wheels (run `make device-wheels`): {', '.join(missing)}")
    lines += [f"- total: {total / 2**20:.2f} MiB of 64 MiB: {'OK' if total <= CARRY_LIMIT else 'OVER THE LIMIT'}", "",
              "Device tool call: `run(command=\"bash benchmarks/device_check.sh $OUT\", carry=[\".whl\"], "
              "timeout_s=560)`"]
    return "\n".join(lines) + "\n"
