import json

import numpy as np
import onnx
import pytest
import torch

from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.export.onnx_graph import inspect_onnx, topk_nodes
from prtool.runtime.session import ort_session


def _export(tiny, tmp_path, schedule="1:16,2:16", scorer="cls-attn", **kw):
    out = tmp_path / "m.onnx"
    res = export_onnx(tiny, EncoderSpec(schedule_for(tiny, schedule), scorer, gather=kw.pop("gather", "flat")), out,
                      ExportOptions(**kw))
    return res


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_validates_with_both_exporters(tiny, tmp_path, exporter):
    res = _export(tiny, tmp_path, scorer="predictor", exporter=exporter, with_kept_indices=True)
    assert res.report.passed, res.report.failure_summary()
    model = onnx.load(str(res.onnx_path))
    tk = topk_nodes(model)
    assert len(tk) == 1 and tk[0]["constant_k"] and tk[0]["k"] == 48 and tk[0]["sorted"]
    m = res.report.metrics
    for label in ("batch 1", "batch 7"):
        e = m[f"image_embeds @ {label}"]
        assert e["max_abs"] <= 1e-4 and e["min_cosine"] >= 0.9999
        assert m[f"kept_patch_indices @ {label}"]["untied_differences"] == 0
    assert m["batch_independence_max_abs"] <= 1e-4
    man = json.loads(res.manifest_path.read_text())
    assert man["exporter"] == exporter and man["schedule"]["string"] == "1:16,2:16"
    assert man["outputs"][1] == {"name": "kept_patch_indices", "dtype": "int64", "shape": ["batch", 32],
                                 "meaning": man["outputs"][1]["meaning"]}
    assert man["onnx_sha256"] and man["preprocess"]["image_size"] == [64, 64]


def test_onnxruntime_matches_pytorch_on_fresh_batches(tiny, tmp_path, tiny_pixels):
    """Independent of the built-in validation: ORT vs PyTorch at batch 1 and 7."""
    # cls-attn: a scorer with no weights of its own, so a fresh PyTorch encoder is the same function
    res = _export(tiny, tmp_path, scorer="cls-attn", validate=False)
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn"))
    sess = ort_session(res.onnx_path)
    for batch in (tiny_pixels[:1], tiny_pixels):
        got = sess.run(None, {"pixel_values": batch.numpy()})[0]
        with torch.no_grad():
            ref = enc(batch).numpy()
        assert np.abs(got - ref).max() <= 1e-4
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.9999


def test_empty_schedule_export_has_no_topk_and_same_contract(tiny, tmp_path):
    res = _export(tiny, tmp_path, schedule="none")
    assert res.report.passed
    info = inspect_onnx(res.onnx_path)
    assert info["topk"] == []
    assert info["inputs"] == [{"name": "pixel_values", "dtype": "float", "shape": ["batch", 3, 64, 64]}]
    assert info["outputs"] == [{"name": "image_embeds", "dtype": "float", "shape": ["batch", 24]}]


@pytest.mark.parametrize("gather, op", [("flat", "Gather"), ("elements", "GatherElements"), ("nd", "Gather")])
def test_gather_modes_export(tiny, tmp_path, gather, op):
    res = _export(tiny, tmp_path, gather=gather)
    assert res.report.passed
    assert op in inspect_onnx(res.onnx_path)["op_histogram"]


def test_reference_evaluator_agrees(tiny, tmp_path, tiny_pixels):
    from onnx.reference import ReferenceEvaluator

    res = _export(tiny, tmp_path, validate=False, with_kept_indices=True)
    ref = ReferenceEvaluator(str(res.onnx_path))
    emb, kept = ref.run(None, {"pixel_values": tiny_pixels[:2].numpy()})
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(schedule_for(tiny, "1:16,2:16"), "cls-attn"), return_indices=True)
    with torch.no_grad():
        t_emb, t_kept = enc(tiny_pixels[:2])
    assert np.abs(emb - t_emb.numpy()).max() <= 1e-4
    for a, b in zip(kept, t_kept.numpy()):
        assert set(a.tolist()) == set(b.tolist())


def test_batch_independence_is_checked_per_sample(tiny, tmp_path, tiny_pixels):
    res = _export(tiny, tmp_path, with_kept_indices=True, validate=False)
    sess = ort_session(res.onnx_path)
    full = sess.run(None, {"pixel_values": tiny_pixels.numpy()})
    for i in range(7):
        alone = sess.run(None, {"pixel_values": tiny_pixels[i : i + 1].numpy()})
        assert np.abs(alone[0][0] - full[0][i]).max() <= 1e-5
        assert set(alone[1][0].tolist()) == set(full[1][i].tolist())


def test_inspect_reports_trt_readiness(tiny, tmp_path):
    res = _export(tiny, tmp_path)
    r = inspect_onnx(res.onnx_path)["tensorrt_readiness"]
    assert r["ready"], r
    assert [c["check"] for c in r["checks"]][:3] == ["opset in TensorRT 10 range", "TopK K constant and <= 3840",
                                                      "static shapes except batch"]


def test_no_normalize(tiny, tmp_path, tiny_pixels):
    res = _export(tiny, tmp_path, normalize=False, validate=False)
    out = ort_session(res.onnx_path).run(None, {"pixel_values": tiny_pixels.numpy()})[0]
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)


@pytest.mark.slow
def test_vit_b16_paper_schedule_exports_and_validates(tmp_path):
    from prtool.encoder.models import load_clip

    torch.manual_seed(0)
    loaded = load_clip("ViT-B-16", "none")
    res = export_onnx(loaded, EncoderSpec(schedule_for(loaded, "3:20,5:20,7:20,9:20"), "predictor"),
                      tmp_path / "vitb16.onnx", ExportOptions(batch_size=3))
    assert res.report.passed, res.report.failure_summary()
    tk = topk_nodes(onnx.load(str(res.onnx_path), load_external_data=False))
    assert [t["k"] for t in tk] == [176]
    assert res.manifest["schedule"]["final_keep"] == 116
