"""`prtool package --triton`: model folders whose config.pbtxt, parsed back, matches the ONNX graph."""

import json
import re

import onnx
import pytest
from conftest import cli

from prtool.deploy.build_config import resolve_build_config
from prtool.deploy.engine_manifest import build_engine_manifest, engine_manifest_path
from prtool.deploy.triton import package_triton
from prtool.encoder.build import EncoderSpec, schedule_for
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.util.files import write_json_atomic

ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n\s*)*("(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+)')


def parse_pbtxt(text: str) -> dict:
    """A tiny protobuf text-format reader: repeated fields become lists, messages dicts."""
    tokens = [m.group(1) for m in _TOKEN.finditer(text)]
    pos = 0

    def scalar(tok):
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        return scalar(tok)

    def message(end):
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            out.setdefault(key, []).extend(v if isinstance(v, list) else [v])
        pos += 1
        return out

    return message(None)


def _one(msg, key):
    assert len(msg[key]) == 1, msg[key]
    return msg[key][0]


def _check_against_onnx(config: dict, onnx_path):
    model = onnx.load(str(onnx_path))
    for field, values in (("input", model.graph.input), ("output", model.graph.output)):
        assert [_one(t, "name") for t in config[field]] == [v.name for v in values]
        for t, v in zip(config[field], values, strict=True):
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            assert t["dims"] == dims[1:], (t, dims)
            assert _one(t, "data_type") == ONNX_TYPES[v.type.tensor_type.elem_type]


@pytest.fixture(scope="module")
def export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-src") / "tiny.onnx"
    return export_onnx(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn"), out,
                       ExportOptions(with_kept_indices=True, validate=False)).onnx_path


def test_pbtxt_reader_reads_nested_and_repeated_fields():
    cfg = parse_pbtxt('# c\nname: "m"\nmax_batch_size: 4\ninput [ { name: "a" dims: [ 1, 2 ] }, { name: "b" } ]\n'
                      "dynamic_batching { }\n")
    assert cfg == {"name": ["m"], "max_batch_size": [4], "input": [{"name": ["a"], "dims": [1, 2]}, {"name": ["b"]}],
                   "dynamic_batching": [{}]}


def _fake_engine(export, min_batch=1, max_batch=16):
    """A stand-in .plan with a real manifest (the engine bytes are never loaded by packaging)."""
    cfg = resolve_build_config(export, "fp16", min_batch, min_batch, max_batch)
    plan = export.with_name(f"tiny-{min_batch}.plan")
    plan.write_bytes(b"engine bytes")
    io = [{"name": "pixel_values", "mode": "input", "dtype": "float32", "shape": [-1, 3, 64, 64]},
          {"name": "image_embeds", "mode": "output", "dtype": "float32", "shape": [-1, 24]},
          {"name": "kept_patch_indices", "mode": "output", "dtype": "int64", "shape": [-1, 32]}]
    runtime = {"tensorrt": "10.3.0", "cuda": {"driver": "12.4", "torch_build": "12.4"},
               "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"}}
    write_json_atomic(engine_manifest_path(plan), build_engine_manifest(cfg, plan.name, plan.read_bytes(), runtime, io,
                                                                        [], 1.0))
    return plan


def test_onnx_and_engine_repository(export, tmp_path):
    plan = _fake_engine(export)
    models = package_triton([export, plan], tmp_path / "repo", name="clip")
    assert [m["name"] for m in models] == ["clip_onnx", "clip_trt"]
    for m, platform, file, max_batch in ((models[0], "onnxruntime_onnx", "model.onnx", 32),
                                         (models[1], "tensorrt_plan", "model.plan", 16)):
        folder = tmp_path / "repo" / m["name"]
        cfg = parse_pbtxt((folder / "config.pbtxt").read_text())
        assert _one(cfg, "name") == m["name"] and _one(cfg, "platform") == platform
        assert _one(cfg, "max_batch_size") == max_batch and cfg["dynamic_batching"] == [{}]
        _check_against_onnx(cfg, export)
        assert (folder / "1" / file).exists()
        assert json.loads((folder / "prtool_manifest.json").read_text())["prtool_manifest"] == 1
        readme = (folder / "README.md").read_text()
        assert f"perf_analyzer -m {m['name']} -b 8" in readme and "tritonserver --model-repository=" in readme
    assert (tmp_path / "repo" / "clip_onnx" / "1" / "model.onnx").read_bytes() == export.read_bytes()
    assert "TensorRT 10.3.0" in (tmp_path / "repo" / "clip_trt" / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["clip_onnx", "clip_trt"]  # no temp folder left


def test_package_cli_and_refusals(capsys, export, tmp_path):
    repo = tmp_path / "repo"
    code, out, err = cli(capsys, "package", export, "--triton", repo, "--max-batch", "4", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["models"][0]["name"] == "tiny" and res["models"][0]["max_batch_size"] == 4
    assert res["models"][0]["inputs"] == [["pixel_values", "float32", [3, 64, 64]]]
    cfg = parse_pbtxt((repo / "tiny" / "config.pbtxt").read_text())
    _check_against_onnx(cfg, export)
    cases = [
        ([export, "--triton", repo], "already exists"),
        ([export, export, "--triton", tmp_path / "r2"], "pass one .onnx"),
        ([_fake_engine(export, min_batch=2), "--triton", tmp_path / "r3"], "rebuild it with --min-batch 1"),
        ([_fake_engine(export), "--triton", tmp_path / "r4", "--max-batch", "64"], "outside engine"),
        ([export.with_name("none.onnx"), "--triton", tmp_path / "r5"], "does not exist"),
    ]
    for args, fragment in cases:
        code, out, err = cli(capsys, "package", *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and fragment in lines[0], err
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # nothing half-written
    for r in ("r3", "r4"):
        assert not (tmp_path / r).exists() or not any((tmp_path / r).iterdir())
