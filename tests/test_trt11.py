"""TensorRT 11 first, 10.8+ as the fallback, checked without TensorRT: the version rule (flags and trtexec
lines per major), the build and runner's calls into fake ``tensorrt`` objects (plugins, stream, device,
dtype, checked return values), onnxruntime's GPU options, the gpu extras' pins, readiness with plugins,
and the mixed-precision ONNX run in onnxruntime CPU against PyTorch."""

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import cli
from test_deploy import one_line_error, vit_b16_like

import prtool.deploy.trt as trt_mod
from prtool.deploy.build_config import resolve_build_config
from prtool.errors import MissingDependencyError, PrtoolError
from prtool.runtime import trt_version as tv
from prtool.runtime.trt_version import trtexec_command
from prtool.util.recipes import tomllib

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "export" / "recipes" / "vit-b-16-4x20-fp16.toml"
REMOVED_IN_11 = ("--fp16", "--bf16", "--int8", "--fp8", "--best", "--precisionConstraints", "--layerPrecisions")


@pytest.fixture
def vitb16(tmp_path):
    return vit_b16_like(tmp_path / "vitb16.onnx")


# ---- the version rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, installed, major", [
    (None, None, 11), (None, "11.4.0.106", 11), (None, "10.8.0.43", 10), (10, None, 10), (10, "11.4.0", 10),
])
def test_major_is_requested_else_installed_else_11(requested, installed, major):
    assert tv.resolve_major(requested, installed) == major


@pytest.mark.parametrize("requested, installed, fragment", [
    (9, None, "--trt-version 9 is not supported"), (None, "10.7.0", "prtool supports 10.8+ and 11.x"),
    (None, "12.0.1", "prtool supports 10.8+ and 11.x"),
])
def test_unsupported_majors_are_refused(requested, installed, fragment):
    with pytest.raises(PrtoolError, match=fragment.replace("+", r"\+")):
        tv.resolve_major(requested, installed)


def test_trtexec_line_per_major(vitb16, tmp_path):
    engine = tmp_path / "model.plan"
    weak = resolve_build_config(vitb16, "fp16", trt_version=10, engine=engine)
    line10 = trtexec_command(weak, engine)
    assert f"--onnx={vitb16}" in line10 and "--fp16" in line10 and "--precisionConstraints=obey" in line10
    assert weak.mixed_onnx is None and tv.network_flags(weak) == ()
    typed = resolve_build_config(vitb16, "fp16", trt_version=11, engine=engine)
    line11 = trtexec_command(typed, engine)
    assert typed.mixed_onnx == tmp_path / "model.fp16.onnx" and line11[1] == f"--onnx={typed.mixed_onnx}"
    assert not any(a.startswith(REMOVED_IN_11 + ("--stronglyTyped",)) for a in line11), line11
    assert typed.enabled_types == () and tv.network_flags(typed) == () and typed.to_dict()["tensorrt_major"] == 11
    ten_typed = resolve_build_config(vitb16, "bf16", strongly_typed=True, trt_version=10, engine=engine)
    line = trtexec_command(ten_typed, engine)
    assert "--stronglyTyped" in line and "--bf16" not in line and line[1] == f"--onnx={tmp_path / 'model.bf16.onnx'}"
    assert tv.network_flags(ten_typed) == ("STRONGLY_TYPED",) and ten_typed.enabled_types == ()
    fp32 = trtexec_command(resolve_build_config(vitb16, "fp32", trt_version=11), engine)
    assert "--noTF32" in fp32 and f"--onnx={vitb16}" in fp32


def test_dry_run_prints_the_line_of_the_requested_major(capsys, vitb16):
    code, out10, err = cli(capsys, "build", vitb16, "--recipe", RECIPE, "--dry-run", "-q", "--trt-version", "10")
    assert code == 0, err
    assert "--fp16 " in out10 and "--layerPrecisions=" in out10
    code, out11, err = cli(capsys, "build", vitb16, "--recipe", RECIPE, "--dry-run", "-q", "--trt-version", "11")
    assert code == 0, err
    assert "--onnx=runs/vit-b-16-4x20/model.fp16.onnx" in out11 and not any(f in out11 for f in REMOVED_IN_11)
    code, _, err = cli(capsys, "build", vitb16, "--dry-run", "--trt-version", "11", "--precision", "best")
    one_line_error(code, err, "--precision best needs TensorRT 10's weak typing", "use --precision fp16 or bf16")


def test_an_already_mixed_graph_builds_by_its_own_types(vitb16, tmp_path):
    model = onnx.load(str(vitb16))
    w = model.graph.initializer[0]
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w).astype(np.float16), w.name))
    onnx.save(model, str(tmp_path / "half.onnx"))
    cfg = resolve_build_config(tmp_path / "half.onnx", trt_version=11)
    assert cfg.precision == "graph" and cfg.mixed_onnx is None and cfg.tolerance_key == "fp16"
    on10 = resolve_build_config(tmp_path / "half.onnx", trt_version=10)
    assert tv.network_flags(on10) == ("STRONGLY_TYPED",) and on10.enabled_types == ()
    with pytest.raises(PrtoolError, match="already holds fp16"):
        resolve_build_config(tmp_path / "half.onnx", "fp16", trt_version=11)


# ---- fake TensorRT ------------------------------------------------------------------------------------

class _Flags(types.SimpleNamespace):
    def __getattr__(self, name):  # a flag TensorRT's major does not have
        raise AttributeError(f"type object 'BuilderFlag' has no attribute '{name}'")


def fake_tensorrt(version="11.4.0.106", calls=None, *, plugins=True, cache_ok=True, cache=b"cache",
                  engine_ok=True, input_dtype="float32", shape_ok=True):
    """A ``tensorrt`` module with the calls prtool makes; ``calls`` records them in order."""
    calls = [] if calls is None else calls
    flags = ["TF32", "DEBUG"] + (["FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if version.startswith("10")
                                 else [])
    t = types.SimpleNamespace(__version__=version, float32="float32", float16="float16", bfloat16="bfloat16",
                              int32="int32", int64="int64", bool="bool", int8="int8")
    t.BuilderFlag = _Flags(**{f: f for f in flags})
    t.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    t.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    t.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    t.LayerType = types.SimpleNamespace(NORMALIZATION="norm", SOFTMAX="softmax")
    t.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})

    def init_plugins(logger, namespace):
        calls.append(("init_libnvinfer_plugins", namespace))
        return plugins
    t.init_libnvinfer_plugins = init_plugins

    class Context:
        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, shape))
            return shape_ok

        def get_tensor_shape(self, name):
            return (2, 4)

        def set_tensor_address(self, name, ptr):
            calls.append(("set_tensor_address", name))

        def execute_async_v3(self, handle):
            calls.append(("execute_async_v3", handle))
            return True

    class Engine:
        num_io_tensors = 2
        names = ["pixel_values", "image_embeds"]
        get_tensor_name = lambda self, i: self.names[i]  # noqa: E731
        get_tensor_mode = lambda self, n: "in" if n == "pixel_values" else "out"  # noqa: E731
        get_tensor_dtype = lambda self, n: input_dtype if n == "pixel_values" else "float32"  # noqa: E731
        get_tensor_shape = lambda self, n: [-1, 3, 8, 8] if n == "pixel_values" else [-1, 4]  # noqa: E731
        create_execution_context = lambda self: Context()  # noqa: E731

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls.append(("deserialize_cuda_engine",))
            return Engine() if engine_ok else None
    t.Runtime = Runtime

    class Config:
        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, blob):
            return blob

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            return cache_ok

        def get_timing_cache(self):
            return None if cache is None else types.SimpleNamespace(serialize=lambda: cache)

    class Network:
        num_inputs, num_layers = 1, 0
        get_input = lambda self, i: types.SimpleNamespace(name="pixel_values")  # noqa: E731

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        create_builder_config = lambda self: Config()  # noqa: E731
        create_optimization_profile = lambda self: types.SimpleNamespace(set_shape=lambda *a: None)  # noqa: E731

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"plan"
    t.Builder = Builder

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", Path(path).name))
            return True
    t.OnnxParser = Parser
    return t


def _runtime(trt="11.4.0.106"):
    return {"tensorrt": trt, "cuda": {"driver": "13.0", "torch_build": "13.0"},
            "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}}


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kwargs):
        calls = []
        module = fake_tensorrt(calls=calls, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(trt_mod, "runtime_info", lambda device=0: _runtime(module.__version__))
        return module, calls
    return install


def test_build_on_11_sets_no_removed_flag_and_inits_plugins_first(fake_trt, vitb16, tmp_path):
    _, calls = fake_trt()
    cfg = resolve_build_config(vitb16, "fp32", trt_version=11, timing_cache=tmp_path / "t.cache")
    manifest = trt_mod.build_engine(cfg, tmp_path / "m.plan")
    names = [c[0] for c in calls]
    assert names.index("init_libnvinfer_plugins") < names.index("parse_from_file")
    assert ("create_network", 0) in calls and ("clear_flag", "TF32") in calls
    assert not any(c[0] == "set_flag" for c in calls)
    assert manifest["build"]["tensorrt_major"] == 11 and (tmp_path / "m.plan").read_bytes() == b"plan"
    assert (tmp_path / "t.cache").read_bytes() == b"cache"


def test_build_on_11_fp16_parses_the_mixed_onnx(fake_trt, vitb16, tmp_path, monkeypatch):
    import shutil

    import prtool.export.mixed_precision as mp

    _, calls = fake_trt()
    written = []
    monkeypatch.setattr(mp, "write_mixed_onnx", lambda src, dst, *a: written.append(dst) or shutil.copy(src, dst))
    cfg = resolve_build_config(vitb16, "fp16", trt_version=11, engine=tmp_path / "m.plan")
    trt_mod.build_engine(cfg, tmp_path / "m.plan")
    assert written == [tmp_path / "m.fp16.onnx"] and ("parse_from_file", "m.fp16.onnx") in calls
    assert not any(c[0] == "set_flag" for c in calls)


def test_build_on_10_weakly_typed_sets_its_flags(fake_trt, vitb16, tmp_path):
    _, calls = fake_trt(version="10.13.0.35")
    trt_mod.build_engine(resolve_build_config(vitb16, "fp16", trt_version=10), tmp_path / "m.plan")
    assert [c[1] for c in calls if c[0] == "set_flag"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    _, calls = fake_trt(version="10.13.0.35")
    trt_mod.build_engine(resolve_build_config(vitb16, None, strongly_typed=True, trt_version=10), tmp_path / "n.plan")
    assert ("create_network", 1 << 5) in calls


@pytest.mark.parametrize("kwargs, fragment", [
    ({"cache_ok": False}, "TensorRT refused the timing cache"),
    ({"plugins": False}, "init_libnvinfer_plugins returned False"),
    ({"engine_ok": False}, "TensorRT could not deserialize the engine just built"),
])
def test_build_error_paths_are_one_line_errors(fake_trt, vitb16, tmp_path, kwargs, fragment):
    fake_trt(**kwargs)
    with pytest.raises(PrtoolError, match=fragment):
        trt_mod.build_engine(resolve_build_config(vitb16, "fp32", timing_cache=tmp_path / "t.cache"),
                             tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()


def test_missing_timing_cache_keeps_the_plan(fake_trt, vitb16, tmp_path):
    fake_trt(cache=None)
    trt_mod.build_engine(resolve_build_config(vitb16, "fp32", timing_cache=tmp_path / "t.cache"), tmp_path / "m.plan")
    assert (tmp_path / "m.plan").exists() and not (tmp_path / "t.cache").exists()


def test_build_refuses_a_config_for_another_major(fake_trt, vitb16, tmp_path):
    fake_trt(version="10.13.0.35")
    with pytest.raises(PrtoolError, match="configuration is for TensorRT 11 but TensorRT 10.13.0.35 is installed"):
        trt_mod.build_engine(resolve_build_config(vitb16, "fp32", trt_version=11), tmp_path / "m.plan")


class FakeCuda:
    """CPU stand-in for the runner's CUDA calls: records the device made current and hands out one stream."""

    def __init__(self):
        self.current = None
        self.stream = types.SimpleNamespace(cuda_stream=4242, synchronize=lambda: None)

    def use_device(self, index):
        self.current = index
        return torch.device("cpu")

    def new_stream(self, device):
        return self.stream

    def wait_current(self, stream, device):
        pass


@pytest.fixture
def fake_engine(tmp_path):
    from prtool.deploy.engine_manifest import engine_manifest_path
    from prtool.util.files import write_json_atomic

    plan = tmp_path / "e.plan"
    plan.write_bytes(b"plan")
    import hashlib

    manifest = {"kind": "tensorrt-engine", "engine_sha256": hashlib.sha256(b"plan").hexdigest(),
                "profile": {"min": [1, 3, 8, 8], "max": [4, 3, 8, 8]}, **_runtime()}
    write_json_atomic(engine_manifest_path(plan), manifest)
    return plan


def _runner(monkeypatch, fake_trt, plan, device=0, **kwargs):
    module, calls = fake_trt(**kwargs)
    cuda = FakeCuda()
    monkeypatch.setattr(trt_mod, "CUDA", cuda)
    return trt_mod.TensorRTRunner(plan, device=device), calls, cuda


def test_runner_feeds_engine_dtype_on_its_own_stream_and_device(monkeypatch, fake_trt, fake_engine):
    runner, calls, cuda = _runner(monkeypatch, fake_trt, fake_engine, device=1, input_dtype="float16")
    out = runner.infer({"pixel_values": np.zeros((2, 3, 8, 8), np.float32)})
    assert cuda.current == 1 and runner._bound["pixel_values"].dtype == torch.float16
    assert ("execute_async_v3", 4242) in calls and out["image_embeds"].shape == (2, 4)
    names = [c[0] for c in calls]
    assert names.index("init_libnvinfer_plugins") < names.index("deserialize_cuda_engine")


def test_runner_error_paths(monkeypatch, fake_trt, fake_engine):
    with pytest.raises(PrtoolError, match="could not deserialize .*rebuild it with `prtool build`"):
        _runner(monkeypatch, fake_trt, fake_engine, engine_ok=False)
    runner, _, _ = _runner(monkeypatch, fake_trt, fake_engine, shape_ok=False)
    with pytest.raises(PrtoolError, match=r"rejected input shape \[2, 3, 9, 9\] for pixel_values"):
        runner.infer({"pixel_values": np.zeros((2, 3, 9, 9), np.float32)})


# ---- onnxruntime on GPUs, and the install story -------------------------------------------------------

def test_cuda_provider_runs_fp32_without_tf32():
    from prtool.runtime.ort_gpu import provider_options

    assert provider_options("cuda", "fp32") == [{"use_tf32": "0"}, {}]
    assert provider_options("tensorrt", "fp32")[1] == {"use_tf32": "0"}
    assert provider_options("tensorrt", "fp16", trt_major=10)[1] == {}
    with pytest.raises(PrtoolError, match="TensorRT 11 has no weak typing"):
        provider_options("tensorrt", "fp16", trt_major=11)


def test_tensorrt_provider_imports_tensorrt_before_the_session(monkeypatch, vitb16):
    from prtool.runtime.session import ort_session

    made = []

    class Session:
        def __init__(self, path, so, providers):
            made.append("tensorrt" in sys.modules and sys.modules["tensorrt"] is not None)

        def get_providers(self):
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    fake_ort = types.SimpleNamespace(
        __version__="1.26.0",
        get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        SessionOptions=lambda: types.SimpleNamespace(add_session_config_entry=lambda *a: None),
        InferenceSession=Session)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(MissingDependencyError, match="tensorrt is not installed .*TensorRT provider"):
        ort_session(vitb16, "tensorrt")
    assert made == []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0.35"))
    ort_session(vitb16, "tensorrt")
    assert made == [True]
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106"))  # 1.26's provider is for TensorRT 10
    with pytest.raises(PrtoolError, match="onnxruntime 1.26.0's TensorRT provider is built for TensorRT 10, but "
                                          "TensorRT 11 is installed: pip install 'prtool.gpu.'"):
        ort_session(vitb16, "tensorrt")
    assert made == [True]


def test_gpu_extras_pin_matching_tensorrt_onnxruntime_and_cuda():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major, stack in tv.GPU_STACKS.items():
        deps = extras[stack["extra"]]
        assert stack["tensorrt"] in deps and stack["tensorrt"].startswith(f"tensorrt-cu{stack['cuda']}>={major}.")
        assert f"onnxruntime-gpu[cuda,cudnn]{stack['onnxruntime_gpu']}" in deps
        assert "prtool[mixed]" in deps
    assert tv.GPU_STACKS[11]["onnxruntime_gpu"].startswith(">=1.27")  # the first with a TensorRT 11 provider
    assert tv.GPU_STACKS[10]["onnxruntime_gpu"].endswith("<1.27") and tv.GPU_STACKS[10]["tensorrt"].endswith("<11")
    assert not any(d.startswith("nvidia-modelopt[") for d in extras["mixed"])  # its [onnx] pins old onnxruntime-gpu


def test_fallback_hint_reinstalls_the_gpu_build_over_the_cpu_one():
    from prtool.runtime.ort_gpu import FALLBACK_HINT, check_providers

    assert "pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.27,<2'" in FALLBACK_HINT
    assert "pip uninstall onnxruntime" not in FALLBACK_HINT
    with pytest.raises(PrtoolError, match="--force-reinstall --no-deps"):
        check_providers("cuda", types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"]))
    readme = (ROOT / "README.md").read_text()
    assert tv.gpu_install_command(11) in readme


# ---- readiness: plugins ---------------------------------------------------------------------------------

def test_readiness_names_the_scatter_elements_plugin(tiny, tmp_path, vitb16):
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.export.onnx_export import ExportOptions, export_onnx
    from prtool.export.onnx_graph import trt_readiness

    res = export_onnx(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "tome"), tmp_path / "tome.onnx",
                      ExportOptions(validate=False))
    ready = trt_readiness(onnx.load(str(res.onnx_path)))
    row = next(c for c in ready["checks"] if c["check"] == "registry plugins")
    assert ready["plugins"] and {p["plugin"] for p in ready["plugins"]} == {"ScatterElements"}
    assert "ScatterElements" in row["detail"] and "init_libnvinfer_plugins" in row["detail"]
    assert ready["verdict"] == "ready, with TensorRT plugin ScatterElements"
    plain = trt_readiness(onnx.load(str(vitb16)))
    assert plain["plugins"] == [] and plain["checks"][-1]["detail"] == "none needed"
