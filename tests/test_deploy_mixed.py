"""The mixed-precision ONNX TensorRT 11 builds fp16 from: what stays FP32 (found from the graph), the
converted graph's check, and the graph run in onnxruntime CPU against the FP32 PyTorch encoder."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import cli
from test_deploy import one_line_error

from prtool.deploy.mixed_check import judge
from prtool.export.mixed_precision import check_mixed_graph, fp32_plan, index_path_nodes, scoring_nodes
from prtool.export.validate import MIXED_TOLERANCES


def test_plan_keeps_the_scores_and_the_index_path_in_fp32(exported):
    model = onnx.load(str(exported[0]))
    scores = scoring_nodes(model)
    predictor_ops = {n.name for n in model.graph.node if n.name.startswith("/scorer/predictor/")
                     and n.op_type != "Constant"}
    assert predictor_ops and predictor_ops <= set(scores)
    inits = {t.name for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    others = [by_name[n] for n in scores if not n.startswith("/scorer/")]  # nothing of the encoder itself:
    assert all(n.op_type == "Identity" and set(n.input) <= inits for n in others)  # only the predictor's weights
    index = index_path_nodes(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert index and all(elem.get(t) not in floats for n in index for t in by_name[n].output)  # integer arithmetic
    data_gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and elem.get(n.output[0]) in floats]
    assert data_gathers and not set(data_gathers) & set(index)  # the gathers themselves are on the data path
    plan = fp32_plan(model)
    assert {"LayerNormalization", "Softmax", "TopK"} <= set(plan["op_types"])
    assert "LayerNormalization" not in fp32_plan(model, fp32_norm=False)["op_types"]


def test_judge_applies_its_own_preset():
    base = {"top1_fp32_torch": 70.7, "top1_mixed_onnx": 70.7, "top1_agreement": 1.0, "min_cosine": 0.9999,
            "kept_set_agreement": 0.999}
    assert judge(base, MIXED_TOLERANCES["fp16"])["passed"]
    bad = judge({**base, "top1_mixed_onnx": 70.0, "kept_set_agreement": 0.95}, MIXED_TOLERANCES["fp16"])
    assert [c["check"] for c in bad["checks"] if not c["passed"]] == ["top-1 drop (points)", "kept-index set agreement"]


@pytest.fixture(scope="module")
def mixed(exported):
    pytest.importorskip("modelopt.onnx.autocast")
    from prtool.export.mixed_precision import write_mixed_onnx

    dst = exported[0].with_name("m.fp16.onnx")
    record = write_mixed_onnx(exported[0], dst, "fp16")
    return dst, record


def test_mixed_graph_runs_in_onnxruntime_like_fp32(exported, mixed):
    from prtool.export.manifest import read_manifest_for
    from prtool.runtime.session import ort_session

    dst, record = mixed
    assert record["type"] == "fp16" and record["converter"].startswith("modelopt.onnx.autocast")
    assert read_manifest_for(dst)["mixed_precision"]["fp32_nodes"] == record["fp32_nodes"] > 0
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    ref = ort_session(exported[0]).run(None, {"pixel_values": x})
    got = ort_session(dst).run(None, {"pixel_values": x})
    cos = (ref[0] * got[0]).sum(-1) / np.linalg.norm(ref[0], axis=-1) / np.linalg.norm(got[0], axis=-1)
    assert cos.min() > 0.999 and got[0].dtype == np.float32
    assert all(set(a) == set(b) for a, b in zip(ref[1], got[1]))


def test_check_catches_a_conversion_that_lowers_the_scores(exported):
    autocast = pytest.importorskip("modelopt.onnx.autocast")
    model = onnx.load(str(exported[0]))
    plan = fp32_plan(model)
    everything = autocast.convert_to_mixed_precision(onnx_path=str(exported[0]), low_precision_type="fp16",
                                                     keep_io_types=True, providers=["cpu"], data_max=float("inf"))
    problems = check_mixed_graph(everything, plan, "fp16")
    assert any(p.startswith("LayerNormalization") for p in problems)
    assert any("/scorer/predictor/" in p for p in problems), problems


def test_validate_uses_the_fp16_preset_for_a_mixed_export(checkpoint, mixed):
    from prtool.deploy.verify import validate_artifact
    from prtool.export.validate import PRECISION_TOLERANCES

    res = validate_artifact(mixed[0], pretrained=str(checkpoint))
    assert res["passed"], res["validation"]["checks"]
    assert res["precision"] == "fp16"
    assert res["validation"]["tolerances"]["min_cosine"] == PRECISION_TOLERANCES["fp16"].min_cosine


def test_cli_writes_the_mixed_onnx_only_where_a_major_builds_from_it(capsys, exported, tmp_path):
    pytest.importorskip("modelopt.onnx.autocast")
    out = tmp_path / "e.plan"
    code, stdout, err = cli(capsys, "build", exported[0], "-o", out, "--trt-version", "11", "--mixed-onnx-only",
                            "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["mixed_onnx"] == str(tmp_path / "e.fp16.onnx") and (tmp_path / "e.fp16.json").exists()
    assert not out.exists()
    code, _, err = cli(capsys, "build", exported[0], "-o", out, "--trt-version", "10", "--mixed-onnx-only")
    one_line_error(code, err, "--mixed-onnx-only needs --precision fp16/bf16")


def test_a_manifest_of_another_graph_is_refused_before_and_after_conversion(exported, mixed, tmp_path):
    import shutil

    from prtool.deploy.mixed_check import measure_mixed
    from prtool.errors import PrtoolError
    from prtool.export.mixed_precision import write_mixed_onnx

    src = tmp_path / "m.onnx"  # the fp32 export's manifest beside the mixed graph's bytes
    shutil.copy(mixed[0], src)
    shutil.copy(exported[0].with_suffix(".json"), src.with_suffix(".json"))
    with pytest.raises(PrtoolError, match="is not the graph its manifest"):
        write_mixed_onnx(src, tmp_path / "out.fp16.onnx", "fp16")
    assert not (tmp_path / "out.fp16.onnx").exists() and not (tmp_path / "out.fp16.json").exists()
    swapped = tmp_path / "s.fp16.onnx"  # the mixed manifest beside the fp32 graph
    shutil.copy(exported[0], swapped)
    shutil.copy(mixed[0].with_suffix(".json"), swapped.with_suffix(".json"))
    with pytest.raises(PrtoolError, match="is not the graph its manifest"):
        measure_mixed(swapped, data="testbed", limit=2)
