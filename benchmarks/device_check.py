"""The GPU path in one prepared run: environment, gpu tests, speed, precision drift, rank and train on CUDA.

    bash benchmarks/device_check.sh OUT            # on the GPU machine (installs the carried .whl/ first)
    python benchmarks/device_check.py OUT --smoke  # CPU, testbed-sized, seconds: what `make test` runs
    python benchmarks/device_check.py --dry-run    # what it will run and carry, with sizes

Every step runs in its own process with a time box (killed at its limit, recorded, the run goes
on) inside one overall budget; results are rewritten after each step, so a run cut short still
leaves OUT/device_check.json, OUT/device_check.md and OUT/device_check.log (three files: the
device tool brings back at most eight). Scratch work (rankings, predictors) goes to --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import device_check_report as report_io  # noqa: E402  (benchmarks/device_check_report.py: tables, carried files)

SCHEDULE_4X20 = "3:20,5:20,7:20,9:20"
TESTBED_SCHEDULE = "1:20,2:20,3:19,4:19"


def speed_variants() -> list[str]:
    """The speed variants; rank-and-merge only where this prtool has it."""
    from prtool.bench.speed import VARIANTS

    wanted = ["baseline", "patch-ranking", "patch-ranking-merge", "static", "tome", "evit"]
    return [v for v in wanted if v in VARIANTS]


STEP_ORDER = ["env", "speed_4x20_fp16", "accuracy", "speed_4x20_bf16", "speed_keep60_fp16", "rank_cuda", "rank_cpu",
              "compare_rankings", "train_cuda", "gpu_tests", "speed_keep60_bf16", "train_cpu"]  # most wanted first


def plan(work: Path, smoke: bool) -> list[dict]:
    """The steps: name, argv, time box (s). ``smoke``: testbed-sized CPU versions of the same steps."""
    py, me = sys.executable, str(Path(__file__).resolve())
    dev = "cpu" if smoke else "cuda"
    prtool = [py, "-m", "prtool"]
    if smoke:
        speed_model, schedules = ["-m", "testbed", "-p", "none"], {"4x20": ["-s", TESTBED_SCHEDULE]}
        speed_args = ["--batch-sizes", "1,2", "--warmup", "1", "--iters", "2"]
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not trt", "tests/test_device.py"]
        n_rank, n_rank_cpu, limit, epochs, precisions = 2, 2, ["--limit", "8"], "2", ("bf16",)  # CPU fp16 is slow
        rank_extra = ["--stride", "2"]
    else:
        speed_model = ["-m", "ViT-B-16", "-p", "none"]
        schedules = {"4x20": ["-s", SCHEDULE_4X20], "keep60": ["--keep-ratio", "0.6", "--stages", "1"]}
        speed_args = ["--batch-sizes", "1,32,256", "--warmup", "10", "--iters", "30"]
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not trt",
                 "--continue-on-collection-errors", "tests"]
        n_rank, n_rank_cpu, limit, epochs, precisions, rank_extra = 500, 100, [], "60", ("fp16", "bf16"), []
    steps = [{"name": "env", "argv": [py, me, "--step", "env"], "timeout": 30},
             {"name": "gpu_tests", "argv": tests, "timeout": 100}]
    variants = ",".join(speed_variants())
    for prec in precisions:
        for sname, sargs in schedules.items():
            steps.append({"name": f"speed_{sname}_{prec}", "timeout": 80, "result": f"speed_{sname}_{prec}/speed.json",
                          "argv": prtool + ["bench", "speed", *speed_model, *sargs, "--backends", "torch",
                                            "--device", dev, "--precision", prec, "--variants", variants, *speed_args,
                                            "-o", str(work / f"speed_{sname}_{prec}"), "-q"]})
    steps.append({"name": "accuracy", "timeout": 90, "result": "accuracy.json",
                     "argv": [py, me, "--step", "accuracy", "--workdir", str(work), "--device", dev, *limit]})
    rank = prtool + ["rank", "-m", "testbed", "-d", "testbed", "--split", "train", "--batch-size", "256", *rank_extra,
                     "--json", "-q"]
    steps += [
        {"name": "rank_cuda", "timeout": 90, "json_stdout": True,
         "argv": rank + ["--limit", str(n_rank), "--device", dev, "-o", str(work / "rank_cuda")]},
        {"name": "rank_cpu", "timeout": 120, "json_stdout": True,
         "argv": rank + ["--limit", str(n_rank_cpu), "--device", "cpu", "-o", str(work / "rank_cpu")]},
        {"name": "compare_rankings", "timeout": 30, "result": "compare_rankings.json",
         "argv": [py, me, "--step", "compare_rankings", "--workdir", str(work)]},
        {"name": "train_cuda", "timeout": 60, "json_stdout": True,
         "argv": prtool + ["train", "-r", str(work / "rank_cuda"), "-m", "testbed", "-d", "testbed", "--split", "train",
                           "--epochs", epochs, "--device", dev, "-o", str(work / "pred_cuda.safetensors"), "--json",
                           "-q"]},
    ]
    if not smoke:  # the same code as train_cuda on another device; CUDA graphs need a GPU
        steps.append({"name": "train_cpu", "timeout": 60, "json_stdout": True,
                      "argv": prtool + ["train", "-r", str(work / "rank_cuda"), "-m", "testbed", "-d", "testbed",
                                        "--split", "train", "--epochs", epochs, "--device", "cpu",
                                        "-o", str(work / "pred_cpu.safetensors"), "--json", "-q"]})
        steps.append({"name": "speed_4x20_fp16_cudagraphs", "timeout": 70,
                      "result": "speed_4x20_fp16_cudagraphs/speed.json",
                      "argv": prtool + ["bench", "speed", *speed_model, "-s", SCHEDULE_4X20, "--backends", "torch",
                                        "--device", dev, "--precision", "fp16", "--cuda-graphs",
                                        "--variants", "baseline,patch-ranking,static",  # TopK + gather: capturable
                                        "--batch-sizes", "1,32", "--warmup", "5", "--iters", "30",
                                        "-o", str(work / "speed_4x20_fp16_cudagraphs"), "-q"]})
    steps.sort(key=lambda s: STEP_ORDER.index(s["name"]) if s["name"] in STEP_ORDER else len(STEP_ORDER))
    if smoke:  # one thread: on a shared, oversubscribed CPU, spinning OpenMP threads cost 50x here
        for s in steps:
            s["env"] = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return steps


def run_step(step: dict, work: Path, seconds: float, log) -> dict:
    """Run one step in its own process group, killed at ``seconds``; its output goes to the log."""
    t0 = time.perf_counter()
    log.write(f"\n===== {step['name']} (time box {seconds:.0f} s)\n$ {' '.join(step['argv'])}\n")
    log.flush()
    proc = subprocess.Popen(step["argv"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **step.get("env", {})})
    try:
        out, err = proc.communicate(timeout=seconds)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = f"timed out after {seconds:.0f} s"
    log.write(out + ("\n--- stderr\n" + err if err else ""))
    log.flush()
    rec = {"name": step["name"], "status": status, "seconds": round(time.perf_counter() - t0, 1),
           "argv": step["argv"], "stderr_tail": err[-1500:] if status != "ok" else ""}
    rec["result"] = _read_result(step, work, out)
    if step["name"] == "gpu_tests":
        rec["summary"] = (out.strip().splitlines() or [""])[-1]
    return rec


def _read_result(step: dict, work: Path, out: str):
    try:
        if step.get("json_stdout"):
            return json.loads(out)
        if step.get("result") and (work / step["result"]).exists():
            return json.loads((work / step["result"]).read_text())
        if step["name"] == "env":
            return json.loads(out)
    except json.JSONDecodeError:
        return None
    return None


def run_all(out: Path, work: Path, smoke: bool, budget: float, only: list[str] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(work, smoke) if not only or s["name"] in only]
    report = {"mode": "smoke" if smoke else "device", "budget_s": budget, "workdir": str(work), "steps": []}
    deadline = time.monotonic() + budget
    with open(out / "device_check.log", "w") as log:
        for step in steps:
            left = deadline - time.monotonic()
            if left < min(15, step["timeout"]):
                report["steps"].append({"name": step["name"], "status": f"skipped: {left:.0f} s of the budget left"})
            else:
                report["steps"].append(run_step(step, work, min(step["timeout"], left), log))
            report_io.write(out, report)
            print(f"{step['name']}: {report['steps'][-1]['status']}", file=sys.stderr, flush=True)
    return report


# ---- in-process steps (run as `device_check.py --step NAME`, each in its own time-boxed process) ----

def step_env() -> dict:
    import torch

    from prtool.runtime.envinfo import collect_env

    smi = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    info = {"prtool_env": collect_env(), "nvidia_smi": smi, "python": sys.version.split()[0],
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1),
                       "multiprocessors": p.multi_processor_count}
    return info


def step_accuracy(work: Path, device: str, limit: int | None) -> dict:
    from prtool.bench.precision_drift import markdown_table, precision_drift
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.testbed.spec import PREDICTOR_PATH

    loaded = load_clip("testbed")
    sched = schedule_for(loaded, TESTBED_SCHEDULE)
    specs = {"none": EncoderSpec(schedule_for(loaded, "none")),
             "patch-ranking": EncoderSpec(sched, "predictor", PREDICTOR_PATH),
             "tome": EncoderSpec(sched, "tome"), "evit": EncoderSpec(sched, "evit")}
    result = precision_drift(loaded, load_dataset("testbed", "test").limit(limit), specs, device=device)
    (work / "accuracy.json").write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    return result


def step_compare_rankings(work: Path) -> dict:
    """Per image ranked on both devices: Spearman of the importances, top-k overlap, identical rankings."""
    import numpy as np

    from prtool.ranking.store import load_store
    from prtool.util.stats import spearman

    gpu, cpu = load_store(work / "rank_cuda"), load_store(work / "rank_cpu")
    where = gpu.row_of()
    common = [(where[s], j) for j, s in enumerate(cpu.ids) if s in where]
    n = gpu.rankings.shape[1]
    ks = sorted({10, round(0.6 * n)})
    rho = [spearman(gpu.importance[i], cpu.importance[j]) for i, j in common]
    overlap = {k: [len(set(gpu.rankings[i, :k]) & set(cpu.rankings[j, :k])) / k for i, j in common] for k in ks}
    res = {"images": len(common), "num_patches": n, "spearman_mean": float(np.mean(rho)),
           "spearman_min": float(np.min(rho)),
           "identical_rankings": float(np.mean([np.array_equal(gpu.rankings[i], cpu.rankings[j]) for i, j in common])),
           **{f"top{k}_overlap_mean": float(np.mean(v)) for k, v in overlap.items()},
           "max_abs_importance_diff": float(max(np.abs(gpu.importance[i] - cpu.importance[j]).max()
                                                for i, j in common))}
    (work / "compare_rankings.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, help="Folder for device_check.json/.md/.log.")
    ap.add_argument("--smoke", action="store_true", help="CPU, testbed-sized: the same steps in seconds.")
    ap.add_argument("--dry-run", action="store_true",
                    help="List the steps and the carried files with sizes; run nothing.")
    ap.add_argument("--budget", type=float, default=450.0, help="Seconds for all steps together (default 450).")
    ap.add_argument("--workdir", type=Path, help="Scratch folder (default: a new temporary folder).")
    ap.add_argument("--only", help="Comma-separated step names.")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step == "env":
        print(json.dumps(step_env(), indent=1))
    elif a.step == "accuracy":
        step_accuracy(a.workdir, a.device, a.limit)
    elif a.step == "compare_rankings":
        step_compare_rankings(a.workdir)
    elif a.dry_run:
        work = a.workdir or Path(tempfile.gettempdir()) / "prtool-device-check"
        print(report_io.dry_listing(plan(work, a.smoke), ROOT, a.budget))
    else:
        if a.out is None:
            ap.error("give the output folder (or --dry-run)")
        work = a.workdir or Path(tempfile.mkdtemp(prefix="prtool-device-check-"))
        report = run_all(a.out, work, a.smoke, a.budget, a.only.split(",") if a.only else None)
        failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
        print(f"wrote {a.out}/device_check.md; steps not ok: {', '.join(failed) or 'none'}")
        sys.exit(1 if failed and a.smoke else 0)


if __name__ == "__main__":
    main()
