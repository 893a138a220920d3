"""A bench of deliberately broken exports: each must fail its named validation check, exit 2 and
leave no file, through ``export_onnx``, ``prtool export``, ``prtool validate`` and the engine/ORT-GPU
comparison core (``prtool.export.validate.compare``).

The broken graphs are made by ONNX graph surgery on a real tiny-model export (so PyTorch, the
reference, stays right), except one: a TopK keeping the lowest scores patched into the model
before export, which PyTorch and ONNX then share; only the check against the scorer's own scores
can see that one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

import prtool.export.onnx_export
from prtool.deploy.rebuild import rebuild_encoder
from prtool.deploy.verify import validate_artifact
from prtool.encoder.build import EncoderSpec, schedule_for
from prtool.encoder.models import load_clip
from prtool.encoder.pruned import PrunedVisionTransformer
from prtool.errors import ValidationError
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.export.validate import PRECISION_TOLERANCES, TorchRunner, compare, validation_images
from prtool.runtime.session import OrtRunner
from prtool.util.files import sha256_file

SCHEDULE = "1:16,2:16"
EMB, KEPT = "image_embeds", "kept_patch_indices"


def _const(model, name: str, value) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _reroute_output(model, out_name: str) -> str:
    """Rename the producer of graph output ``out_name``; returns the new inner name to build on."""
    inner = f"{out_name}__inner"
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o == out_name:
                node.output[i] = inner
    return inner


def topk_lowest(model):
    (node,) = [n for n in model.graph.node if n.op_type == "TopK"]
    for a in node.attribute:
        if a.name == "largest":
            a.i = 0
            break
    else:
        node.attribute.append(helper.make_attribute("largest", 0))


def perturbed_weight(model):
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    t = max(floats, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(t)
    noisy = w + 0.05 * w.std() * np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype)
    t.CopyFrom(numpy_helper.from_array(noisy, t.name))


def batch_leak(model):
    """``image_embeds += 0.05 * (batch mean - image_embeds)``: exact at batch 1, leaky above."""
    inner = _reroute_output(model, EMB)
    axes = _const(model, "leak_axes", np.array([0], np.int64))
    c = _const(model, "leak_c", np.array(0.05, np.float32))
    model.graph.node.extend([
        helper.make_node("ReduceMean", [inner, axes], ["leak_mean"], keepdims=1),
        helper.make_node("Sub", ["leak_mean", inner], ["leak_diff"]),
        helper.make_node("Mul", ["leak_diff", c], ["leak_scaled"]),
        helper.make_node("Add", [inner, "leak_scaled"], [EMB]),
    ])


def batch_one_only(model):
    """``image_embeds += 0.05`` only when the batch is 1."""
    inner = _reroute_output(model, EMB)
    zero = _const(model, "b1_zero", np.array(0, np.int64))
    one = _const(model, "b1_one", np.array(1, np.int64))
    c = _const(model, "b1_c", np.array(0.05, np.float32))
    model.graph.node.extend([
        helper.make_node("Shape", ["pixel_values"], ["b1_shape"]),
        helper.make_node("Gather", ["b1_shape", zero], ["b1_batch"], axis=0),
        helper.make_node("Equal", ["b1_batch", one], ["b1_is_one"]),
        helper.make_node("Cast", ["b1_is_one"], ["b1_flag"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["b1_flag", c], ["b1_shift"]),
        helper.make_node("Add", [inner, "b1_shift"], [EMB]),
    ])


def extra_topk(model):
    k = _const(model, "extra_k", np.array([2], np.int64))
    model.graph.node.append(helper.make_node("TopK", ["pixel_values", k], ["extra_values", "extra_indices"], axis=-1))


def second_dynamic_axis(model):
    (out,) = [o for o in model.graph.output if o.name == EMB]
    dim = out.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "embed"


def reordered_kept(model):
    """``kept_patch_indices`` reversed: the same set, least important first."""
    inner = _reroute_output(model, KEPT)
    args = [_const(model, f"rev_{n}", np.array([v], np.int64))
            for n, v in (("starts", -1), ("ends", np.iinfo(np.int64).min), ("axes", 1), ("steps", -1))]
    model.graph.node.append(helper.make_node("Slice", [inner, *args], [KEPT]))


# (broken graph, the check it must fail); "kept ... vs PyTorch" / "top-k by score" rows exist per batch label
CASES = {
    "topk-lowest": (topk_lowest, f"{KEPT} vs PyTorch, batch 7"),
    "perturbed-weight": (perturbed_weight, f"{EMB} vs PyTorch, batch 1"),
    "batch-leak": (batch_leak, "per-sample batch independence"),
    "batch-one-only": (batch_one_only, f"{EMB} vs PyTorch, batch 1"),
    "extra-topk": (extra_topk, "TopK nodes"),
    "second-dynamic-axis": (second_dynamic_axis, "only batch axis dynamic"),
    "reordered-kept": (reordered_kept, f"{KEPT} top-k by score, batch 7"),
}
RUNTIME_CASES = ["topk-lowest", "perturbed-weight", "batch-leak", "batch-one-only", "reordered-kept"]


def break_file(path: Path, surgery) -> None:
    model = onnx.load(str(path))
    surgery(model)
    onnx.save_model(model, str(path))


def failed(checks: list[dict]) -> set[str]:
    return {c["check"] for c in checks if not c["passed"]}


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_clip("prtool-tiny", str(checkpoint))


@pytest.fixture(scope="module")
def good_export(loaded, tmp_path_factory):
    """A correct export with kept indices (cls-attn: rebuildable from its manifest alone), validated."""
    res = export_onnx(loaded, EncoderSpec(schedule_for(loaded, SCHEDULE), "cls-attn"),
                      tmp_path_factory.mktemp("good") / "m.onnx", ExportOptions(with_kept_indices=True))
    assert res.report.passed, res.report.failure_summary()
    return res.onnx_path


@pytest.fixture
def broken_copy(good_export, tmp_path):
    """``make(case)`` -> a broken copy of the good export with its manifest (hash updated: a
    consistently written but wrong artifact)."""

    def make(case: str) -> Path:
        path = tmp_path / f"{case}.onnx"
        shutil.copy(good_export, path)
        break_file(path, CASES[case][0])
        manifest = json.loads(good_export.with_suffix(".json").read_text())
        manifest["onnx_sha256"] = sha256_file(path)
        path.with_suffix(".json").write_text(json.dumps(manifest))
        return path

    return make


@pytest.fixture
def broken_exporter(monkeypatch):
    """Make every export in this test apply ``case``'s surgery right after tracing, before validation."""
    real = prtool.export.onnx_export.trace_to_onnx

    def install(case: str) -> None:
        def traced_then_broken(encoder, example, path, *args):
            real(encoder, example, path, *args)
            break_file(path, CASES[case][0])

        monkeypatch.setattr(prtool.export.onnx_export, "trace_to_onnx", traced_then_broken)

    return install


def test_the_bench_starts_from_a_passing_export(good_export, checkpoint):
    """The surgery, not the baseline, makes each case fail: the untouched export passes every path."""
    res = validate_artifact(good_export, pretrained=str(checkpoint))
    assert res["passed"], failed(res["validation"]["checks"])
    assert {f"{KEPT} top-k by score, batch 7", "TopK nodes", "only batch axis dynamic"} <= {
        c["check"] for c in res["validation"]["checks"]}


@pytest.mark.parametrize("case", list(CASES))
def test_export_library_refuses(case, loaded, broken_exporter, tmp_path):
    broken_exporter(case)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(ValidationError) as exc:
        export_onnx(loaded, EncoderSpec(schedule_for(loaded, SCHEDULE), "cls-attn"), out,
                    ExportOptions(with_kept_indices=True))
    assert CASES[case][1] in failed(exc.value.report.checks)
    assert exc.value.exit_code == 2 and list(out.parent.iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_export_cli_refuses(case, capsys, checkpoint, broken_exporter, tmp_path):
    broken_exporter(case)
    out = tmp_path / "out" / "m.onnx"
    code, _, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", checkpoint, "-s", SCHEDULE, "--scorer", "cls-attn",
                       "--with-kept-indices", "-o", out)
    assert code == 2, err
    assert CASES[case][1] + ":" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_validate_cli_refuses(case, capsys, broken_copy, checkpoint):
    path = broken_copy(case)
    before = sorted(p.name for p in path.parent.iterdir())
    code, out, err = cli(capsys, "validate", path, "-p", checkpoint, "--json")
    assert code == 2, err
    doc = json.loads(out)
    assert doc["passed"] is False and doc["validation"]["passed"] is False
    assert CASES[case][1] in failed(doc["validation"]["checks"])
    assert CASES[case][1] + ":" in err.strip().splitlines()[-1]  # the one-line error names the failed check
    assert sorted(p.name for p in path.parent.iterdir()) == before  # validate writes nothing


@pytest.mark.parametrize("case", RUNTIME_CASES)
def test_verify_core_refuses(case, broken_copy, checkpoint):
    """The comparison every engine and onnxruntime provider goes through, fed the broken graph."""
    path = broken_copy(case)
    manifest = json.loads(path.with_suffix(".json").read_text())
    rebuilt = rebuild_encoder(manifest, str(checkpoint))
    pixels, _ = validation_images(None, rebuilt.loaded.preprocess, 7)
    report = compare(OrtRunner(path), TorchRunner(rebuilt.encoder, rebuilt.output_names), pixels,
                     PRECISION_TOLERANCES["fp32"])
    assert CASES[case][1] in failed(report.checks)


def test_topk_lowest_shared_by_pytorch_and_onnx_is_caught(loaded, tmp_path):
    """TopK keeping the lowest scores patched into the model: ONNX agrees with PyTorch, but the kept
    indices are not the scorer's top-k."""
    real_select, real_topk = PrunedVisionTransformer.select, torch.topk

    def lowest(self, *args):
        with mock.patch.object(torch, "topk", lambda t, k, **kw: real_topk(t, k, **{**kw, "largest": False})):
            return real_select(self, *args)

    out = tmp_path / "out" / "m.onnx"
    with mock.patch.object(PrunedVisionTransformer, "select", lowest), pytest.raises(ValidationError) as exc:
        export_onnx(loaded, EncoderSpec(schedule_for(loaded, SCHEDULE), "cls-attn"), out,
                    ExportOptions(with_kept_indices=True))
    bad = failed(exc.value.report.checks)
    assert bad == {f"{KEPT} top-k by score, batch 1", f"{KEPT} top-k by score, batch 7"}, bad
    assert list(out.parent.iterdir()) == []
