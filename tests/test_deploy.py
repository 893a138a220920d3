"""Engine builds without TensorRT: resolved configurations, trtexec command lines, recipes, engine
manifests and their refusal, onnxruntime provider fallback detection."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper

from prtool.deploy.build_config import fp32_layer_patterns, resolve_build_config, trtexec_command
from prtool.deploy.engine_manifest import (
    build_engine_manifest,
    check_engine_compatible,
    engine_manifest_path,
    engine_mismatches,
    read_engine_manifest,
)
from prtool.errors import PrtoolError
from prtool.runtime.ort_gpu import check_providers, provider_options
from prtool.runtime.session import ort_session
from prtool.util.files import write_json_atomic

RECIPES = Path(__file__).parents[1] / "export" / "recipes"
def one_line_error(code, err, *fragments):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("prtool: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def vit_b16_like(path: Path, batch="batch") -> Path:
    """A small graph with ViT-B/16's I/O contract ([batch, 3, 224, 224] -> [batch, 512]) and
    TorchScript-style LayerNormalization/Softmax node names."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 512], np.random.default_rng(0).standard_normal(1536).tolist())
    ones = helper.make_tensor("g", TensorProto.FLOAT, [512], [1.0] * 512)
    zeros = helper.make_tensor("b", TensorProto.FLOAT, [512], [0.0] * 512)
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0, name="/pool/ReduceMean"),
        helper.make_node("MatMul", ["pooled", "w"], ["h0"], name="/proj/MatMul"),
        helper.make_node("LayerNormalization", ["h0", "g", "b"], ["h1"], axis=-1, name="/ln_pre/LayerNormalization"),
        helper.make_node("Softmax", ["h1"], ["h2"], axis=-1, name="/resblocks.0/attn/Softmax"),
        helper.make_node("LayerNormalization", ["h2", "g", "b"], ["h3"], axis=-1, name="/ln_post/LayerNormalization"),
        helper.make_node("Softmax", ["h3"], ["image_embeds"], axis=-1, name="/resblocks.1/attn/Softmax"),
    ]
    graph = helper.make_graph(nodes, "vitb16_like",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, 224, 224])],
                              [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [batch, 512])],
                              initializer=[w, ones, zeros])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def vitb16(tmp_path):
    return vit_b16_like(tmp_path / "vitb16.onnx")


def test_fp16_config_and_trtexec_command_for_vit_b16(vitb16):
    cfg = resolve_build_config(vitb16, "fp16", 1, 8, 32, timing_cache=Path("cache.bin"), workspace_mib=2048,
                               trt_version=10)
    assert cfg.profile.shapes() == {"min": (1, 3, 224, 224), "opt": (8, 3, 224, 224), "max": (32, 3, 224, 224)}
    assert cfg.enabled_types == ("FP16", "OBEY_PRECISION_CONSTRAINTS") and cfg.tf32 and cfg.fp32_norm
    assert cfg.fp32_layer_patterns == ("*/LayerNormalization", "*/attn/Softmax")
    cmd = trtexec_command(cfg, Path("out.plan"))
    assert cmd[:6] == ["trtexec", f"--onnx={vitb16}", "--saveEngine=out.plan", "--minShapes=pixel_values:1x3x224x224",
                       "--optShapes=pixel_values:8x3x224x224", "--maxShapes=pixel_values:32x3x224x224"]
    assert cmd[6:] == ["--fp16", "--precisionConstraints=obey",
                       "--layerPrecisions=*/LayerNormalization:fp32,*/attn/Softmax:fp32", "--timingCacheFile=cache.bin",
                       "--memPoolSize=workspace:2048", "--skipInference"]
    assert cfg.to_dict()["precision_constraints"] == "obey"


@pytest.mark.parametrize("precision, flags, absent", [
    ("fp32", ["--noTF32"], ["--fp16", "--bf16", "--precisionConstraints=obey"]),
    ("bf16", ["--bf16", "--precisionConstraints=obey"], ["--fp16", "--noTF32"]),
    ("best", ["--fp16", "--bf16", "--precisionConstraints=obey"], ["--best", "--int8", "--noTF32"]),
])
def test_precisions_map_to_trtexec_flags(vitb16, precision, flags, absent):
    cmd = trtexec_command(resolve_build_config(vitb16, precision, trt_version=10), Path("e.plan"))
    assert all(f in cmd for f in flags) and not any(a in cmd for a in absent), cmd


def test_no_fp32_norm_and_strongly_typed(vitb16):
    loose = trtexec_command(resolve_build_config(vitb16, "fp16", fp32_norm=False, trt_version=10), Path("e.plan"))
    assert "--fp16" in loose and not any(a.startswith(("--precisionConstraints", "--layerPrecisions")) for a in loose)
    cfg = resolve_build_config(vitb16, None, strongly_typed=True, trt_version=10)
    assert cfg.precision == "graph" and cfg.graph_float_types == ("fp32",) and not cfg.fp32_norm
    assert cfg.tolerance_key == "fp32" and not cfg.tf32
    cmd = trtexec_command(cfg, Path("e.plan"))
    assert "--stronglyTyped" in cmd and "--fp16" not in cmd and "--noTF32" in cmd
    assert any("runs in FP32" in n for n in cfg.notes)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"precision": "int8"}, "unknown precision 'int8'"),
    ({"precision": "best", "strongly_typed": True, "trt_version": 10}, "--precision best needs TensorRT 10's weak"),
    ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, "1 <= --min-batch <= --opt-batch <= --max-batch"),
    ({"min_batch": 0}, "1 <= --min-batch"),
    ({"workspace_mib": 0}, "--workspace 0"),
])
def test_bad_build_choices(vitb16, kwargs, fragment):
    with pytest.raises(PrtoolError, match=fragment.replace("(", r"\(").replace("*", r"\*")):
        resolve_build_config(vitb16, **kwargs)


def test_static_batch_and_dynamic_spatial_dims(tmp_path):
    fixed = vit_b16_like(tmp_path / "fixed.onnx", batch=4)
    with pytest.raises(PrtoolError, match="fixes the batch of pixel_values at 4"):
        resolve_build_config(fixed)
    assert resolve_build_config(fixed, None, 4, 4, 4).profile.min_batch == 4
    model = onnx.load(str(fixed))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(model, str(tmp_path / "dyn.onnx"))
    with pytest.raises(PrtoolError, match="every axis but the batch must be static"):
        resolve_build_config(tmp_path / "dyn.onnx")


def _matches(pattern: str, name: str) -> bool:
    """trtexec's layer-name matching: at most one '*'."""
    if "*" not in pattern:
        return pattern == name
    head, tail = pattern.split("*")
    return name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_layer_patterns_select_exactly_layernorm_and_softmax(tiny, tmp_path, exporter):
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.export.onnx_export import ExportOptions, export_onnx

    res = export_onnx(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "cls-attn"), tmp_path / "m.onnx",
                      ExportOptions(exporter=exporter, validate=False))
    model = onnx.load(str(res.onnx_path))
    patterns = fp32_layer_patterns(model)
    assert patterns and len(patterns) < 8  # compact wildcards where they are unambiguous
    for node in model.graph.node:
        hit = any(_matches(p, node.name) for p in patterns)
        assert hit == (node.op_type in ("LayerNormalization", "Softmax")), (node.name, node.op_type, patterns)


def test_dry_run_cli_with_recipe(capsys, vitb16, tmp_path):
    code, out, err = cli(capsys, "build", vitb16, "--recipe", RECIPES / "vit-b-16-4x20-fp16.toml", "--dry-run",
                         "--json",
                         "--trt-version", "10")
    assert code == 0, err
    res = json.loads(out)
    assert res["dry_run"] and res["engine"] == "runs/vit-b-16-4x20/model.plan"
    assert res["config"]["precision"] == "fp16" and res["config"]["profile"]["max"] == [32, 3, 224, 224]
    assert "--fp16" in res["trtexec_argv"]
    assert "--timingCacheFile=runs/timing-cache/vit-b-16.cache" in res["trtexec_argv"]
    assert res["tensorrt_readiness"]["ready"]
    code, out, _ = cli(capsys, "build", vitb16, "--dry-run", "-q")
    assert code == 0 and out.strip().startswith("trtexec --onnx=") and out.count("\n") == 1
    code, out, _ = cli(capsys, "build", vitb16, "--dry-run")
    assert code == 0 and "equivalent trtexec command:" in out and "LayerNorm/Softmax in FP32" in out
    assert not list(tmp_path.glob("*.plan")) and not (vitb16.with_suffix(".plan")).exists()


def test_explicit_flags_beat_the_recipe(capsys, vitb16, tmp_path):
    code, out, err = cli(capsys, "build", vitb16, "--recipe", RECIPES / "vit-b-16-4x20-fp16.toml", "--dry-run",
                         "--json",
                         "--precision", "fp32", "--max-batch", "64", "-o", tmp_path / "x.plan")
    assert code == 0, err
    res = json.loads(out)
    assert res["config"]["precision"] == "fp32" and res["config"]["profile"]["max"][0] == 64
    assert res["engine"] == str(tmp_path / "x.plan")


def test_recipes_parse_and_fit_their_models():
    import open_clip

    from prtool.deploy.build_request import BuildRequest
    from prtool.encoder.schedule import parse_schedule
    from prtool.export.request import ExportRequest
    from prtool.util.recipes import read_recipe, recipe_keys

    export_keys, build_keys = set(recipe_keys(ExportRequest)), set(recipe_keys(BuildRequest))
    recipes = sorted(RECIPES.glob("*.toml"))
    assert {r.stem for r in recipes} >= {"vit-b-16-4x20-fp16", "vit-b-32-4x5-fp16", "vit-l-14-4x26-fp16"}
    for path in recipes:
        r = read_recipe(path)
        assert set(r) == {"export", "build"}, path
        assert set(r["export"]) <= export_keys and set(r["build"]) <= build_keys, path
        vision = open_clip.get_model_config(r["export"]["model"])["vision_cfg"]
        grid = vision["image_size"] // vision["patch_size"]
        sched = parse_schedule(r["export"]["schedule"], grid * grid, vision["layers"])
        assert 0.55 <= sched.final_keep / sched.num_patches <= 0.65, path
        assert r["build"]["precision"] in ("fp16", "bf16", "fp32", "best")
    vitb16 = read_recipe(RECIPES / "vit-b-16-4x20-fp16.toml")["export"]
    assert vitb16["schedule"] == "3:20,5:20,7:20,9:20" and vitb16["model"] == "ViT-B-16"


def test_unknown_recipe_keys_are_rejected(capsys, vitb16, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[build]\nprecison = "fp16"\n')
    code, _, err = cli(capsys, "build", vitb16, "--recipe", bad, "--dry-run")
    one_line_error(code, err, "unknown keys ['precison']")
    assert "resolve_build_config" not in err  # the known keys are the command's options only


@pytest.mark.parametrize("args, fragments", [
    (["--trt-version", "9"], ["--trt-version 9 is not supported"]),
    (["--trt-version", "11", "--precision", "best"], ["--precision best needs TensorRT 10's weak typing"]),
    (["--min-batch", "9", "--max-batch", "4"], ["--min-batch"]),
    (["-o", "model.onnx"], ["must end in .plan or .engine"]),
])
def test_bad_build_flags_are_one_line_errors(capsys, vitb16, args, fragments):
    code, out, err = cli(capsys, "build", vitb16, "--dry-run", *args)
    one_line_error(code, err, *fragments)
    assert out == ""


def test_build_without_tensorrt_names_the_fix(capsys, vitb16):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code, _, err = cli(capsys, "build", vitb16, "-o", vitb16.with_suffix(".plan"))
    one_line_error(code, err, "tensorrt is not installed", "pip install 'prtool[gpu]'")
    assert not vitb16.with_suffix(".plan").exists()
    code, _, err = cli(capsys, "build", vitb16.with_name("missing.onnx"), "--dry-run")
    one_line_error(code, err, "does not exist")


def test_deploy_modules_import_no_backend():
    code = ("import sys, prtool.cli.deploy_cmd, prtool.deploy.trt, prtool.runtime.ort_gpu, prtool.deploy.triton, "
            "prtool.deploy.compat, prtool.deploy.verify, prtool.deploy.contract, prtool.deploy.docgen, "
            "prtool.deploy.build_request\n"
            "print(sorted(m for m in ('tensorrt', 'cv2', 'onnxruntime', 'polygraphy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def _fake_runtime(trt="10.3.0", name="NVIDIA L4", cc="8.9"):
    return {"tensorrt": trt, "cuda": {"driver": "12.4", "torch_build": "12.4"},
            "gpu": {"name": name, "compute_capability": cc}}


def _fake_engine(tmp_path, vitb16, runtime):
    cfg = resolve_build_config(vitb16, "fp16")
    plan = tmp_path / "vitb16.plan"
    plan.write_bytes(b"not really an engine")
    io = [{"name": "pixel_values", "mode": "input", "dtype": "float32", "shape": [-1, 3, 224, 224]},
          {"name": "image_embeds", "mode": "output", "dtype": "float32", "shape": [-1, 512]}]
    manifest = build_engine_manifest(cfg, plan.name, plan.read_bytes(), runtime, io, ["ln"] * 2, 12.34)
    write_json_atomic(engine_manifest_path(plan), manifest)
    return plan, manifest


def test_engine_manifest_round_trip_and_hash_check(tmp_path, vitb16):
    plan, manifest = _fake_engine(tmp_path, vitb16, _fake_runtime())
    assert engine_manifest_path(plan).name == "vitb16.plan.json"
    back = read_engine_manifest(plan)
    assert back == json.loads(json.dumps(manifest, default=str))
    assert back["tensorrt"] == "10.3.0" and back["gpu"]["compute_capability"] == "8.9"
    assert back["precision"] == "fp16" and back["validation_preset"] == "fp16"
    assert back["profile"]["opt"] == [8, 3, 224, 224] and back["build"]["pinned_fp32_layers"] == 2
    assert back["source_onnx"]["sha256"] and back["source_onnx"]["manifest"] is None
    plan.write_bytes(b"another engine")
    with pytest.raises(PrtoolError, match="describes another engine"):
        read_engine_manifest(plan)
    engine_manifest_path(plan).unlink()
    with pytest.raises(PrtoolError, match="has no manifest vitb16.plan.json"):
        read_engine_manifest(plan)


def test_mismatched_engine_is_refused_naming_both_systems():
    built = _fake_runtime()
    assert engine_mismatches(built, _fake_runtime()) == []
    check_engine_compatible(built, _fake_runtime())
    diffs = engine_mismatches(built, _fake_runtime(trt="10.7.0", name="NVIDIA H100 80GB HBM3", cc="9.0"))
    assert diffs == ["TensorRT 10.3.0 != 10.7.0", "compute capability 8.9 != 9.0",
                     "GPU 'NVIDIA L4' != 'NVIDIA H100 80GB HBM3'"]
    with pytest.raises(PrtoolError) as exc:
        check_engine_compatible(built, _fake_runtime(trt="10.7.0"), "m.plan")
    msg = str(exc.value)
    assert "TensorRT 10.3.0 on NVIDIA L4" in msg and "TensorRT 10.7.0 on NVIDIA L4" in msg and "prtool build" in msg
    other = _fake_runtime(name="NVIDIA L4 (other)")
    assert engine_mismatches(built, other) == ["GPU 'NVIDIA L4' != 'NVIDIA L4 (other)'"]


class FakeSession:
    def __init__(self, providers):
        self._providers = providers

    def get_providers(self):
        return self._providers


def test_provider_fallback_is_detected():
    with pytest.raises(PrtoolError, match="fell back from CUDAExecutionProvider to CPUExecutionProvider"):
        check_providers("cuda", FakeSession(["CPUExecutionProvider"]))
    with pytest.raises(PrtoolError, match="fell back from TensorrtExecutionProvider"):
        check_providers("tensorrt", FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    session = FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert check_providers("cuda", session)[0] == "CUDAExecutionProvider"
    assert check_providers("cpu", FakeSession(["CPUExecutionProvider"])) == ["CPUExecutionProvider"]


def test_provider_options_and_missing_gpu_provider(vitb16):
    cfg = resolve_build_config(vitb16, "fp16")
    trt_opts = provider_options("tensorrt", "fp16", cfg.profile, cache_dir=Path("/tmp/c"))
    assert len(trt_opts) == 3 and trt_opts[1:] == [{}, {}]
    assert trt_opts[0]["trt_fp16_enable"] and trt_opts[0]["trt_layer_norm_fp32_fallback"]
    assert trt_opts[0]["trt_profile_max_shapes"] == "pixel_values:32x3x224x224"
    assert not provider_options("tensorrt", "fp32")[0]["trt_fp16_enable"]
    with pytest.raises(PrtoolError, match="prtool build --precision bf16"):
        provider_options("cuda", "bf16")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(PrtoolError, match="CUDAExecutionProvider is not in this onnxruntime build"):
            ort_session(vitb16, "cuda")
    assert ort_session(vitb16, "cpu").get_providers() == ["CPUExecutionProvider"]


def test_engine_validation_needs_tensorrt_and_rejects_onnx_options(capsys, tmp_path, vitb16):
    plan, _ = _fake_engine(tmp_path, vitb16, _fake_runtime())
    code, _, err = cli(capsys, "validate", plan, "--provider", "cuda")
    one_line_error(code, err, "apply to ONNX files")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the missing-TensorRT message cannot be shown (trt tests cover engines)")
    code, _, err = cli(capsys, "validate", plan)
    one_line_error(code, err, "tensorrt is not installed", "pip install 'prtool[gpu]'")
