"""Shared fixtures: tiny open_clip architectures registered from tests/configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).parent / "configs"
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    import open_clip

    for cfg in sorted(CONFIGS.glob("*.json")):
        if cfg.stem not in open_clip.list_models():
            open_clip.add_model_config(cfg)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = has_gpu
    except ImportError:
        has_trt = False
    for item in items:
        # markers, not keywords: keywords hold the checkout's directory name too (a checkout in ./trt skipped all)
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))
        if item.get_closest_marker("trt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="TensorRT or a GPU is missing"))
    order_for_mutmut(items)


@pytest.fixture(scope="session")
def tiny():
    """A random-weight tiny CLIP: 64x64 images, patch 8 (64 patches), width 32, 4 blocks."""
    from prtool.encoder.models import load_clip

    torch.manual_seed(0)
    return load_clip("prtool-tiny", "none")


@pytest.fixture(scope="session")
def tiny_pixels():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, 64, 64, generator=g)


LAUNCHER = (
    "import open_clip, pathlib, sys\n"
    f"[open_clip.add_model_config(p) for p in sorted(pathlib.Path({str(CONFIGS)!r}).glob('*.json'))]\n"
    "from prtool.cli.app import main\n"
    "sys.argv = ['prtool'] + sys.argv[1:]\n"
    "main()\n"
)


def write_launcher(directory: Path) -> Path:
    """A script that runs the real CLI with the tiny test configs registered (for torchrun and Popen)."""
    path = Path(directory) / "prtool_cli.py"
    path.write_text(LAUNCHER)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the real CLI in a subprocess, with the tiny configs registered."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


@pytest.fixture(scope="session")
def tiny_testbed_like():
    """The testbed architecture with random weights (fast to build; no checkpoint needed)."""
    from prtool.encoder.models import load_clip

    return load_clip("testbed", "none")


def cli(capsys, *args):
    """Run ``prtool ARGS`` in-process through the real entry point (its one-line error contract
    included); returns ``(exit_code, stdout, stderr)``."""
    from prtool.cli.app import main

    argv, sys.argv = sys.argv, ["prtool", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return (exc.value.code or 0), out, err


@pytest.fixture(scope="session")
def checkpoint(tiny, tmp_path_factory):
    """The tiny model saved as a checkpoint file (an export made from it can be rebuilt by `prtool validate`)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """``(onnx_path, predictor_path)``: a pruned tiny export (a seeded predictor file, kept indices) made
    from ``checkpoint``, unvalidated; one per test module, which may write beside it."""
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.encoder.predictor import PredictorConfig, RankingPredictor, save_predictor
    from prtool.export.onnx_export import ExportOptions, export_onnx

    loaded = load_clip("prtool-tiny", str(checkpoint))
    work = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    predictor = work / "pred.safetensors"
    save_predictor(RankingPredictor(PredictorConfig(64, 32)), predictor, {"model_id": loaded.model_id, "rank_block": 1})
    res = export_onnx(loaded, EncoderSpec(schedule_for(loaded, "1:16,2:16"), "predictor", predictor, "flat"),
                      work / "m.onnx", ExportOptions(with_kept_indices=True, validate=False))
    return res.onnx_path, predictor


def order_for_mutmut(items) -> None:
    """Under `make mutate` (mutmut sets MUTANT_UNDER_TEST and runs in mutants/), a mutant's tests run fastest
    first (durations from mutmut's own stats), so a killed mutant costs its fastest failing test, not a random one."""
    stats = Path("mutmut-stats.json")
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.is_file():
        return
    import json

    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: duration.get(item.nodeid, float("inf")))
