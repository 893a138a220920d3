"""``prtool export --quantize``: the ranking/TopK/index path stays exact, quantized exports validate
(batch independence included), the manifest records the calibration, build maps Q/DQ to explicit INT8."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from prtool.errors import PrtoolError


@pytest.fixture(scope="module")
def calib_folder(tmp_path_factory):
    """A class-folder dataset with a train split: 6 small RGB images in 2 classes."""
    root = tmp_path_factory.mktemp("calib") / "ds"
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def quantized(exported, checkpoint, calib_folder):
    """``{mode: path}``: the module's pruned tiny export quantized by both INT8 modes."""
    from prtool.encoder.models import load_clip
    from prtool.export.quantize import QuantizeOptions, calibration_batch, quantize_onnx

    onnx_path, _ = exported
    loaded = load_clip("prtool-tiny", str(checkpoint))
    out = {}
    for mode in ("int8-dynamic", "int8-qdq"):
        opts = QuantizeOptions(mode, str(calib_folder) if mode == "int8-qdq" else None, calib_images=4)
        calib = calibration_batch(loaded.preprocess, opts)[0] if mode == "int8-qdq" else None
        out[mode] = onnx_path.with_name(f"m.{mode}.onnx")
        quantize_onnx(onnx_path, out[mode], opts, calib)
    return out


def _by_output(model):
    return {t: n for n in model.graph.node for t in n.output}


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-qdq"])
def test_topk_k_constant_and_index_path_int64_and_unquantized(exported, quantized, mode):
    from prtool.export.onnx_graph import load_onnx, op_histogram, topk_nodes
    from prtool.export.quantize import never_quantized
    from prtool.export.quantize_check import QUANT_OPS, check_quantized_graph

    fp32 = load_onnx(exported[0])
    never = never_quantized(fp32)  # from the FP32 graph, before quantization
    model = load_onnx(quantized[mode])
    ops = op_histogram(model)
    assert ops.get("MatMulInteger" if mode == "int8-dynamic" else "QuantizeLinear", 0) > 0  # it did quantize
    assert check_quantized_graph(model, never) == []
    tk = topk_nodes(model)
    assert [t["k"] for t in tk] == [t["k"] for t in topk_nodes(fp32)] and all(t["constant_k"] for t in tk)
    prod = _by_output(model)
    for node in model.graph.node:
        if node.op_type in ("TopK", "Gather", "GatherElements", "GatherND") or node.name.startswith("/scorer/"):
            assert not [t for t in node.input if t in prod and prod[t].op_type in QUANT_OPS], node.name
    scorer = [(n.name, n.op_type) for n in fp32.graph.node if n.name.startswith("/scorer/")]
    assert scorer and set(scorer) <= {(n.name, n.op_type) for n in model.graph.node}  # the predictor, as exported
    kept = next(o for o in model.graph.output if o.name == "kept_patch_indices")
    assert kept.type.tensor_type.elem_type == 7  # int64


def test_graph_check_catches_a_quantized_scorer(exported, tmp_path, monkeypatch):
    """A plan that forgets the scorer: the scorer's MatMuls are quantized and quantize_onnx refuses the graph."""
    import prtool.export.quantize as q

    monkeypatch.setattr(q, "exclusion_plan", lambda model, mode, extra=(): {"op_types": ["MatMul", "Gemm"],
                                                                             "nodes": []})
    dst = tmp_path / "bad.onnx"
    with pytest.raises(PrtoolError, match=r"is wrong: node \S*scorer\S* is gone"):
        q.quantize_onnx(exported[0], dst, q.QuantizeOptions("int8-dynamic"))
    assert not dst.exists()


def test_qdq_scales_are_static_so_batches_are_independent_dynamic_ones_are_not(quantized, tiny_pixels):
    from prtool.export.quantize_check import batch_independence
    from prtool.runtime.session import ort_session

    x = tiny_pixels.numpy()
    static = batch_independence(ort_session(quantized["int8-qdq"]), x)
    dynamic = batch_independence(ort_session(quantized["int8-dynamic"]), x)
    assert static["max_abs"] <= 1e-5 and static["kept_set_changes"] == 0
    assert dynamic["max_abs"] > 1e-5  # per-batch activation scales: the check sees the coupling


@pytest.fixture(scope="module")
def qdq_export(exported, checkpoint, tmp_path_factory):
    from prtool.encoder.build import EncoderSpec, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.export.onnx_export import ExportOptions
    from prtool.export.quantize import QuantizeOptions, export_quantized

    loaded = load_clip("prtool-tiny", str(checkpoint))
    spec = EncoderSpec(schedule_for(loaded, "1:16,2:16"), "predictor", exported[1], "flat")
    out = tmp_path_factory.mktemp("qexport") / "q.onnx"
    qopts = QuantizeOptions("int8-qdq", "testbed", calib_images=32, calib_seed=3)  # like the validation images
    return loaded, qopts, export_quantized(loaded, spec, out, ExportOptions(with_kept_indices=True), qopts)


def test_quantized_export_validates_with_its_own_preset(qdq_export):
    _, _, res = qdq_export
    checks = {c["check"]: c for c in res.report.checks}
    assert res.report.passed, res.report.failure_summary()
    assert checks["per-sample batch independence"]["passed"]
    assert res.report.metrics["batch_independence"]["max_abs"] <= 1e-5
    assert any(name.startswith("kept_patch_indices vs FP32 PyTorch") for name in checks)
    assert res.manifest["fp32_validation"]["passed"]  # the FP32 export passed the unchanged FP32 checks first


def test_manifest_records_mode_calibration_and_fingerprint(qdq_export):
    from prtool.export.quantize import calibration_batch
    from prtool.util.files import sha256_file

    loaded, qopts, res = qdq_export
    m = json.loads(res.manifest_path.read_text())
    q = m["quantization"]
    assert q["mode"] == "int8-qdq" and q["fp32_onnx_sha256"] != m["onnx_sha256"]
    assert m["onnx_sha256"] == sha256_file(res.onnx_path)
    pixels, _ = calibration_batch(loaded.preprocess, qopts)
    assert q["calibration"] == {"dataset": "testbed", "split": "train", "images": 32, "seed": 3,
                                "sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    other, _ = calibration_batch(loaded.preprocess, type(qopts)("int8-qdq", "testbed", calib_images=32))
    assert hashlib.sha256(other.tobytes()).hexdigest() != q["calibration"]["sha256"]  # the seed draws the images


def test_build_dry_run_maps_qdq_to_explicit_int8(qdq_export, quantized):
    from prtool.deploy.build_config import resolve_build_config, trtexec_command

    _, _, res = qdq_export
    for major, want in ((11, []), (10, ["--stronglyTyped"])):
        cfg = resolve_build_config(res.onnx_path, trt_version=major)
        cmd = trtexec_command(cfg, res.onnx_path.with_suffix(".plan"))
        assert cfg.precision == "graph" and cfg.mixed_onnx is None
        assert [c for c in cmd if c in ("--stronglyTyped", "--int8", "--fp16", "--best")] == want
        assert f"--onnx={res.onnx_path}" in cmd
    with pytest.raises(PrtoolError, match="without --precision"):
        resolve_build_config(res.onnx_path, precision="fp16", trt_version=11)
    with pytest.raises(PrtoolError, match="int8-dynamic"):
        resolve_build_config(quantized["int8-dynamic"], trt_version=11)


def test_inspect_shows_the_quantization(qdq_export, capsys):
    from conftest import cli

    _, qopts, res = qdq_export
    code, out, err = cli(capsys, "inspect", res.onnx_path)
    assert code == 0, err
    assert "quantization: int8-qdq" in out and "32 images, seed 3" in out


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int4"], "unknown --quantize 'int4'"),
    (["--quantize", "int8-qdq"], "needs --calib-data"),
    (["--quantize", "int8-qdq", "--calib-data", "no/such/data"], "--calib-data: dataset no/such/data does not exist"),
    (["--quantize", "int8-dynamic", "--calib-data", "testbed"], "takes none"),
])
def test_bad_quantize_input_is_one_line_and_writes_nothing(exported, checkpoint, tmp_path, capsys, extra, message):
    from conftest import cli

    out = tmp_path / "o" / "q.onnx"
    code, stdout, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", checkpoint, "-s", "1:16,2:16",
                            "--predictor", exported[1], "-o", out, *extra)
    lines = [line for line in err.splitlines() if line.strip() and "ranking with" not in line]
    assert code == 1 and len(lines) == 1 and message in lines[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_bench_speed_and_accuracy_take_quantized_rows(tiny, tmp_path):
    from prtool.bench.accuracy import bench_accuracy
    from prtool.bench.speed import bench_speed
    from prtool.data.datasets import load_dataset
    from prtool.encoder.build import schedule_for

    res = bench_speed(tiny, "1:16", None, 1, None, ["baseline", "cls-attn+int8-dynamic"], ["onnxruntime"], [2],
                      warmup=1, iters=1, workdir=tmp_path / "s")
    assert [r["variant"] for r in res["results"]] == ["baseline", "cls-attn+int8-dynamic"]
    with pytest.raises(PrtoolError, match="needs --calib-data"):
        bench_speed(tiny, "1:16", None, 1, None, ["cls-attn+int8-qdq"], ["onnxruntime"], [2], workdir=tmp_path)
    data = load_dataset("testbed", "test").limit(6)
    quant = {"modes": ["fp32", "int8-dynamic"], "calib": None, "workdir": tmp_path / "a"}
    acc = bench_accuracy(tiny, data, [schedule_for(tiny, "1:16")], ["none", "cls-attn"], batch_size=3, quantize=quant)
    rows = {r["method"]: r for r in acc["rows"]}
    assert rows["cls-attn+fp32"]["top1"] == rows["cls-attn"]["top1"]  # the ONNX FP32 twin scores like PyTorch
    assert rows["cls-attn+fp32"]["kept_set_agreement_with_fp32"] == 1.0
    assert rows["cls-attn+int8-dynamic"]["paired_vs"] == "cls-attn (fp32 PyTorch)"
    assert 0.5 < rows["cls-attn+int8-dynamic"]["cosine_to_fp32"] <= 1.0


def test_static_batch_rule_fails_a_batch_coupled_graph(exported, checkpoint, quantized):
    """The dynamic graph judged by the static (exact) rule: the batch-independence row must fail."""
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.export.quantize_check import validate_quantized

    loaded = load_clip("prtool-tiny", str(checkpoint))
    spec = EncoderSpec(schedule_for(loaded, "1:16,2:16"), "predictor", exported[1], "flat")
    encoder, _ = build_pruned_encoder(loaded, spec, normalize=True, return_indices=True)
    report = validate_quantized(quantized["int8-dynamic"], encoder, "int8-qdq", preprocess=loaded.preprocess)
    row = next(c for c in report.checks if c["check"] == "per-sample batch independence")
    assert not row["passed"], row


def test_validate_checks_a_quantized_export_with_its_preset(qdq_export, checkpoint, capsys):
    """`prtool validate` on a quantized export: the mode's own preset (as its export validated it), not the FP32 one
    it cannot meet; FP32 tolerance flags are refused, not silently ignored."""
    from conftest import cli

    _, _, res = qdq_export
    code, out, err = cli(capsys, "validate", res.onnx_path, "-p", checkpoint, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["precision"] == "int8-qdq (quantized)" and result["passed"]
    assert result["validation"]["tolerances"]["min_kept_agreement"] == 0.90  # the quantized preset's fields
    assert any(c["check"].startswith("kept_patch_indices vs FP32 PyTorch") for c in result["validation"]["checks"])
    code, _, err = cli(capsys, "validate", res.onnx_path, "-p", checkpoint, "--atol", "0.1")
    assert code == 1 and "quantized export (int8-qdq)" in err and "Traceback" not in err
