"""The one verification path: ``prtool.export.validate.compare`` on fake runners (each check fails for its own
fault), the one onnxruntime session factory's optimisation level, and the one-line failure every
command (export, validate on ONNX, validate on an engine) prints the same way."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from prtool.errors import PrtoolError, ValidationError
from prtool.export.io_names import EMBEDS, KEPT_INDICES, PIXELS
from prtool.export.validate import FIXES, RecordedRunner, Tolerances, ValidationReport, compare

B, N, K, E = 5, 12, 4, 6
PIXELS_ = np.random.default_rng(0).standard_normal((B, 3, 2, N)).astype(np.float32)


class Model:
    """A deterministic encoder in numpy: per-patch scores, top-K kept (most important first), an embedding.

    ``fault`` breaks one thing the way a broken export would.
    """

    outputs = [EMBEDS, KEPT_INDICES]

    def __init__(self, fault: str | None = None):
        self.fault = fault

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.sum(axis=(1, 2))  # [B, N]

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        x = np.asarray(feeds[PIXELS])
        kept = np.argsort(-self.scores(x), axis=1, kind="stable")[:, :K]
        emb = x.reshape(len(x), -1)[:, :E].astype(np.float32) + 2.0
        if self.fault == "drift":
            emb = emb + 1e-2
        if self.fault == "batch-one-only" and len(x) == 1:
            emb = emb + 1e-2
        if self.fault == "leak":
            emb = emb + 0.05 * (emb.mean(0, keepdims=True) - emb)
        if self.fault == "wrong-kept":
            kept = np.argsort(self.scores(x), axis=1, kind="stable")[:, :K]  # the lowest scores
        if self.fault == "reordered":
            kept = kept[:, ::-1]
        if self.fault == "shape":
            emb = emb[:, :-1]
        out = {EMBEDS: emb, KEPT_INDICES: kept.astype(np.int64)}
        if self.fault == "missing":
            del out[KEPT_INDICES]
        return out


def failed(report: ValidationReport) -> set[str]:
    return {c["check"] for c in report.checks if not c["passed"]}


def test_a_faithful_runner_passes_every_row():
    report = compare(Model(), Model(), PIXELS_)
    assert report.passed and failed(report) == set()
    assert [c["check"] for c in report.checks] == [  # batch 1 first, outputs in the reference's order
        f"{EMBEDS} vs PyTorch, batch 1", f"{KEPT_INDICES} vs PyTorch, batch 1",
        f"{KEPT_INDICES} top-k by score, batch 1", f"{EMBEDS} vs PyTorch, batch {B}",
        f"{KEPT_INDICES} vs PyTorch, batch {B}", f"{KEPT_INDICES} top-k by score, batch {B}",
        "per-sample batch independence"]
    assert report.metrics["batch_independence_max_abs"] == 0.0


class Fed(Model):
    """``Model`` that records the dtype and memory layout of every batch it is fed."""

    def __init__(self):
        super().__init__()
        self.fed = set()

    def infer(self, feeds):
        self.fed.add((feeds[PIXELS].dtype, feeds[PIXELS].flags.c_contiguous))
        return super().infer(feeds)


def test_runners_are_fed_float32_c_contiguous_pixels_whatever_the_images_are():
    images = np.asfortranarray(PIXELS_.astype(np.float64))  # float64, not C-contiguous
    runner, reference = Fed(), Fed()
    assert compare(runner, reference, images).passed
    assert runner.fed == reference.fed == {(np.dtype(np.float32), True)}


@pytest.mark.parametrize("fault, rows, fix", [
    ("drift", {f"{EMBEDS} vs PyTorch, batch 1", f"{EMBEDS} vs PyTorch, batch {B}"}, "values"),
    ("batch-one-only", {f"{EMBEDS} vs PyTorch, batch 1", "per-sample batch independence"}, "values"),
    ("leak", {f"{EMBEDS} vs PyTorch, batch {B}", "per-sample batch independence"}, "values"),
    ("wrong-kept", {f"{KEPT_INDICES} vs PyTorch, batch 1", f"{KEPT_INDICES} vs PyTorch, batch {B}",
                    f"{KEPT_INDICES} top-k by score, batch 1", f"{KEPT_INDICES} top-k by score, batch {B}"}, "kept"),
    ("reordered", {f"{KEPT_INDICES} top-k by score, batch 1", f"{KEPT_INDICES} top-k by score, batch {B}"}, "order"),
    ("shape", {f"{EMBEDS} vs PyTorch, batch 1", f"{EMBEDS} vs PyTorch, batch {B}"}, "graph"),
])
def test_each_fault_fails_its_own_rows(fault, rows, fix):
    report = compare(Model(fault), Model(), PIXELS_)
    assert failed(report) == rows
    first = next(c for c in report.checks if not c["passed"])
    assert first["fix"] == FIXES[fix]


class Alone(Model):
    """``Model`` whose outputs change only in a way the batch independence row can see: ``how`` is
    ``alone-<j>`` (sample j's embedding shifted by 0.5 when it runs alone), ``kept-alone`` (sample 0 alone
    keeps another set), ``kept-order-alone`` (every sample alone keeps its set in reverse order) or
    ``first`` (the embeddings depend on which sample comes first in a batch: only the reversed batch shows it)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def infer(self, feeds):
        out = super().infer(feeds)
        x = np.asarray(feeds[PIXELS])
        alone = len(x) == 1
        if self.how.startswith("alone-") and alone and np.array_equal(x[0], PIXELS_[int(self.how[6:])]):
            out[EMBEDS] = out[EMBEDS] + np.float32(0.5)
        if self.how == "kept-alone" and alone and np.array_equal(x[0], PIXELS_[0]):
            out[KEPT_INDICES] = np.argsort(-self.scores(x), axis=1, kind="stable")[:, 1 : K + 1].astype(np.int64)
        if self.how == "kept-order-alone" and alone:
            out[KEPT_INDICES] = out[KEPT_INDICES][:, ::-1].copy()
        if self.how == "first" and not alone:
            out[EMBEDS] = out[EMBEDS] + np.abs(x[0] - PIXELS_[0]).sum()
        return out


def _independence(how: str, tol: Tolerances = Tolerances()) -> tuple[bool, float]:
    report = compare(Alone(how), Model(), PIXELS_, tol, batch_one=False)
    assert failed(report) <= {"per-sample batch independence"}  # every other row still passes
    return "per-sample batch independence" not in failed(report), report.metrics["batch_independence_max_abs"]


@pytest.mark.parametrize("j", [0, B - 1])
def test_independence_runs_every_sample_alone_and_a_change_at_atol_passes(j):
    ok, worst = _independence(f"alone-{j}")
    assert not ok and worst == pytest.approx(0.5, abs=1e-6)
    assert _independence(f"alone-{j}", Tolerances(atol=worst)) == (True, worst)  # the bound holds with equality


def test_independence_compares_kept_sets_and_the_reversed_batch():
    assert _independence("kept-alone") == (False, float("inf"))
    assert _independence("kept-order-alone") == (True, 0.0)  # the same set in another order is the same patches
    ok, worst = _independence("first")
    assert not ok and worst > 1.0


def test_a_wrong_shape_is_recorded_with_both_shapes():
    report = compare(Model("shape"), Model(), PIXELS_, batch_one=False, independence=False)
    assert report.metrics[f"{EMBEDS} @ batch {B}"] == {"shape": [B, E - 1], "reference_shape": [B, E]}
    assert [(c["check"], c["passed"], c["fix"]) for c in report.checks if c["check"].startswith(EMBEDS)] == [
        (f"{EMBEDS} vs PyTorch, batch {B}", False, FIXES["graph"])]


def test_kept_sets_may_differ_only_at_exact_ties():
    tied = PIXELS_.copy()
    scores = Model().scores(tied)
    order = np.argsort(-scores, axis=1, kind="stable")
    for i in range(B):  # make the k-th and (k+1)-th patches tie exactly, then swap them in the runner
        tied[i, :, :, order[i, K]] = tied[i, :, :, order[i, K - 1]]

    class Swapped(Model):
        def infer(self, feeds):
            out = super().infer(feeds)
            x = np.asarray(feeds[PIXELS])
            nxt = np.argsort(-self.scores(x), axis=1, kind="stable")[:, K]
            out[KEPT_INDICES] = np.concatenate([out[KEPT_INDICES][:, :-1], nxt[:, None]], axis=1)
            return out

    assert compare(Swapped(), Model(), tied).passed
    assert f"{KEPT_INDICES} vs PyTorch, batch {B}" in failed(compare(Swapped(), Model(), PIXELS_))


def test_switches_and_refusals():
    report = compare(Model("batch-one-only"), Model(), PIXELS_, batch_one=False, independence=False)
    assert report.passed and all("batch 1" not in c["check"] for c in report.checks)
    assert "batch_independence_max_abs" not in report.metrics
    with pytest.raises(PrtoolError, match=rf"has no output\(s\) \['{KEPT_INDICES}'\].*re-export or rebuild"):
        compare(Model("missing"), Model(), PIXELS_)
    tight = compare(Model(), RecordedRunner(Model("drift").infer({PIXELS: PIXELS_}), PIXELS_), PIXELS_,
                    Tolerances(atol=0.1), batch_one=False, independence=False)
    assert tight.passed  # the tolerances given are the ones applied
    recorded = RecordedRunner(Model().infer({PIXELS: PIXELS_}), PIXELS_)
    with pytest.raises(PrtoolError, match="only for the batch they were recorded on"):
        compare(recorded, Model(), PIXELS_)


def test_a_failed_report_raises_one_line_naming_checks_and_fix():
    report = compare(Model("reordered"), Model(), PIXELS_)
    with pytest.raises(ValidationError) as exc:
        report.raise_if_failed("the thing", "--allow-it", {"passed": False})
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == 2 and exc.value.report is report
    assert exc.value.result == {"passed": False}
    assert msg.startswith(f"validation of the thing failed: {KEPT_INDICES} top-k by score, batch 1: ")
    assert msg.endswith(f"; fix: {FIXES['order']} (--allow-it)") and msg.count(FIXES["order"]) == 1
    compare(Model(), Model(), PIXELS_).raise_if_failed("the thing", "--allow-it")  # passing: no error


# ---- the one onnxruntime session factory -------------------------------------------------------------

def _tiny_graph(path, fp16: bool | str):
    """``y = x + w`` on [1, 4]; with ``fp16`` the addition runs in float16 between casts (as AutoCast writes);
    with ``"weights"`` only ``w`` is stored in float16 (cast up to float32 for the addition)."""
    w = numpy_helper.from_array(np.ones((1, 4), np.float16 if fp16 else np.float32), "w")
    if fp16 == "weights":
        nodes = [helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
                 helper.make_node("Add", ["x", "w32"], ["y"])]
    elif fp16:
        nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
                 helper.make_node("Add", ["x16", "w"], ["y16"]),
                 helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    else:
        nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_session_factory_picks_the_optimisation_level_for_the_graph(tmp_path):
    import onnxruntime as ort

    from prtool.runtime.session import OrtRunner, ort_session

    fp16, fp32 = _tiny_graph(tmp_path / "h.onnx", True), _tiny_graph(tmp_path / "f.onnx", False)
    weights16 = _tiny_graph(tmp_path / "w.onnx", "weights")
    level = ort.GraphOptimizationLevel
    assert ort_session(fp16).get_session_options().graph_optimization_level == level.ORT_ENABLE_EXTENDED
    assert ort_session(weights16).get_session_options().graph_optimization_level == level.ORT_ENABLE_EXTENDED
    assert ort_session(fp32).get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    forced = ort_session(fp32, optimization="ORT_ENABLE_BASIC").get_session_options()
    assert forced.graph_optimization_level == level.ORT_ENABLE_BASIC
    assert forced.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    out = OrtRunner(fp16).infer({"x": np.zeros((1, 4), np.float64)})  # float feeds are run as float32
    assert out["y"].tolist() == [[1.0] * 4]
    with pytest.raises(PrtoolError, match="runs prtool's graphs at fp32, not fp16"):
        ort_session(fp32, "cpu", "fp16")


# ---- one failure line for every command ----------------------------------------------------------------

LINE = re.compile(r"^prtool: error: validation of (?P<subject>.+) failed: (?P<checks>.+); fix: (?P<fix>.+) "
                  r"\((?P<allow>[^()]+)\)$")


def _fake_engine(monkeypatch, onnx_path, tmp_path):
    """A ``.plan`` whose runner is onnxruntime on ``onnx_path``: `prtool validate`'s engine path, minus TensorRT."""
    import prtool.deploy.trt as trt_mod
    from prtool.runtime.session import OrtRunner

    class Engine(OrtRunner):
        def __init__(self, plan):
            super().__init__(onnx_path)
            self.batch_range = (1, 8)
            self.manifest = {"source_onnx": {"manifest": json.loads(onnx_path.with_suffix(".json").read_text())},
                             "validation_preset": "fp32", "tensorrt": "fake", "precision": "fp32",
                             "gpu": {"name": "no GPU"}}

    monkeypatch.setattr(trt_mod, "TensorRTRunner", Engine)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    return plan


def test_every_command_prints_a_failed_validation_the_same_way(capsys, monkeypatch, exported, checkpoint, tmp_path):
    onnx_path, predictor = exported
    zero = ["--atol", "0", "--rtol", "0"]
    runs = {
        "export": ["export", "-m", "prtool-tiny", "-p", checkpoint, "-s", "1:16,2:16", "--predictor", predictor,
                   "--with-kept-indices", "-o", tmp_path / "out" / "m.onnx", *zero],
        "validate": ["validate", onnx_path, "-p", checkpoint, *zero],
        "verify": ["validate", _fake_engine(monkeypatch, onnx_path, tmp_path), "-p", checkpoint, *zero],
    }
    for name, args in runs.items():
        code, out, err = cli(capsys, *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        match = LINE.match(lines[-1])
        assert code == 2 and match, (name, err)
        assert sum("prtool: error" in line for line in lines) == 1 and "Traceback" not in err
        assert f"{EMBEDS} vs PyTorch, batch 7: max abs" in match["checks"], name
        assert "allow-failed-validation" in match["allow"]
        assert FIXES["values"] in match["fix"].split("; "), name
        assert "validation (failed)" in err and out == ""  # the checks table goes to stderr
        code, out, err = cli(capsys, *args, "--json")
        assert code == 2 and json.loads(out)["passed"] is False and LINE.match(err.strip().splitlines()[-1])
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ---- consumers and recorded outputs are runners too ------------------------------------------------------

def test_a_consumer_is_a_runner_on_the_files_behind_the_pixels(monkeypatch, tmp_path):
    from prtool.deploy import consumers

    files = [tmp_path / f"img{i}.png" for i in range(B)]
    by_file = dict(zip(files, PIXELS_))
    calls = []

    def fake_cpp(onnx, images, backend):  # the consumer "decodes" each file to its row of pixels
        calls.append((backend, [p.name for p in images]))
        out = Model().infer({PIXELS: np.stack([by_file[p] for p in images])})
        return {"images": [{EMBEDS: e.tolist(), KEPT_INDICES: k.tolist(), "path": str(p)}
                           for e, k, p in zip(out[EMBEDS], out[KEPT_INDICES], images)]}

    monkeypatch.setattr(consumers, "run_cpp", fake_cpp)
    runner = consumers.ConsumerRunner("cpp-openvino", tmp_path / "m.onnx", files, PIXELS_)
    report = compare(runner, Model(), PIXELS_)
    assert report.passed and "per-sample batch independence" in {c["check"] for c in report.checks}
    assert calls[0] == ("openvino", [p.name for p in files]) and (("openvino", [files[2].name]) in calls)
    assert ("openvino", [p.name for p in files[::-1]]) in calls  # the reversed batch
    shuffled = consumers.ConsumerRunner("cpp-openvino", tmp_path / "m.onnx", files[::-1], PIXELS_)
    assert f"{EMBEDS} vs PyTorch, batch {B}" in failed(compare(shuffled, Model(), PIXELS_))
    with pytest.raises(PrtoolError, match="runs on image files"):
        runner.infer({PIXELS: PIXELS_ + 1})
    with pytest.raises(PrtoolError, match="unknown consumer 'cpp-x'"):
        consumers.run_consumer("cpp-x", tmp_path / "m.onnx", files)


def test_compat_cells_are_judged_by_compare():
    from prtool.deploy.compat import cell_result as cell

    ref = Model().infer({PIXELS: PIXELS_})[EMBEDS]
    assert cell("ok", [ref], ref, PIXELS_)["status"] == "pass"
    drift = cell("ok", [ref + 1e-2], ref, PIXELS_)
    assert drift["status"] == "mismatch" and drift["max_abs"] == pytest.approx(1e-2, rel=1e-3)
    short = cell("ok", [ref[:, :-1]], ref, PIXELS_)
    assert short == {"status": "mismatch", "detail": f"shape [{B}, {E - 1}], PyTorch's [{B}, {E}]"}
    assert cell("crash", "the process died", ref, PIXELS_) == {"status": "crash", "detail": "the process died"}
