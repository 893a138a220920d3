"""The validation checks on hand-made inputs whose answers are computed by hand: the elementwise and
cosine comparison, kept-index agreement up to score ties, the top-k order, and the graph rows (TopK count
and constant K, batch-only dynamic axes) on a graph built node by node. Written against the survivors of
`make mutate` (issue #22): each assertion fails on a one-line change of the check it pins."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from prtool.export.validate import (
    Tolerances,
    ValidationReport,
    check_graph,
    compare_embeddings,
    compare_kept,
    topk_order_violations,
)

REF = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
GOT = np.array([[3.0, 4.5, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)  # one element off by 0.5
COS0 = (9 + 18) / (5 * math.sqrt(9 + 4.5**2))  # cosine of row 0; row 1 is 1


def test_embedding_metrics_are_the_hand_computed_ones():
    m = compare_embeddings(GOT, REF, Tolerances(atol=0.6, rtol=0.0, min_cosine=0.99))
    assert m["max_abs"] == pytest.approx(0.5) and m["mean_abs"] == pytest.approx(0.5 / 6)
    assert m["median_abs"] == 0.0
    assert m["min_cosine"] == pytest.approx(COS0, abs=1e-6)
    assert m["mean_cosine"] == pytest.approx((COS0 + 1) / 2, abs=1e-6)
    assert m["within_tolerance"] is True


@pytest.mark.parametrize("tol, within", [
    (Tolerances(atol=0.5, rtol=0.0, min_cosine=0.99), True),  # the bound holds with equality
    (Tolerances(atol=0.49, rtol=0.0, min_cosine=0.99), False),
    (Tolerances(atol=0.0, rtol=0.125, min_cosine=0.99), True),  # 0.125 * |4| = 0.5; exact zeros pass at bound 0
    (Tolerances(atol=0.0, rtol=0.12, min_cosine=0.99), False),
    (Tolerances(atol=0.04, rtol=0.115, min_cosine=0.99), True),  # atol + rtol * |ref| = 0.04 + 0.46
    (Tolerances(atol=1.0, rtol=0.0, min_cosine=0.999), False),  # elementwise fine, cosine 0.9985 too low
    (Tolerances(atol=1.0, rtol=0.0, min_cosine=COS0 - 1e-7), True),  # cosine just above the bound
])
def test_within_tolerance_is_elementwise_bound_and_cosine(tol, within):
    assert compare_embeddings(GOT, REF, tol)["within_tolerance"] is within


def test_a_cosine_equal_to_the_bound_passes():
    unit = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)  # cosines with itself exactly 1.0
    assert compare_embeddings(unit, unit, Tolerances(min_cosine=1.0))["within_tolerance"] is True


def test_the_cosine_does_not_depend_on_the_embeddings_scale():
    small = compare_embeddings(GOT * 1e-3, REF * 1e-3, Tolerances(atol=1.0, rtol=0.0, min_cosine=COS0 - 1e-6))
    assert small["min_cosine"] == pytest.approx(COS0, abs=1e-6) and small["within_tolerance"] is True
    assert small["mean_cosine"] == pytest.approx((COS0 + 1) / 2, abs=1e-6)  # row 1 (norm 1e-3) with itself: 1


def test_a_zero_embedding_has_cosine_zero_not_nan():
    zero = np.zeros((1, 3), dtype=np.float32)
    m = compare_embeddings(zero, zero, Tolerances())
    assert m["min_cosine"] == 0.0 and m["max_abs"] == 0.0 and m["within_tolerance"] is False


def test_kept_sets_agree_up_to_ties_only():
    got = np.array([[0, 1, 2], [3, 4, 5]])
    ref = np.array([[1, 0, 3], [5, 4, 3]])  # row 0 differs in {2, 3}; row 1 is the same set reordered
    m = compare_kept(got, ref, None, 1e-5)
    assert m == {"mean_set_agreement": pytest.approx(5 / 6), "min_set_agreement": pytest.approx(2 / 3),
                 "untied_differences": 2}
    # without scores every difference is untied, summed over the rows (here 2 + 2, not the last row's 2)
    assert compare_kept(np.array([[0, 1], [0, 1]]), np.array([[0, 2], [0, 3]]), None, 1e-5)["untied_differences"] == 4
    tied = np.zeros((2, 8))
    tied[0, :4] = [9.0, 8.0, 5.0, 5.0]  # patches 2 and 3 tie at the boundary (3rd highest score)
    tied[1, 3:6] = [7.0, 6.0, 5.0]
    assert compare_kept(got, ref, tied, 1e-5)["untied_differences"] == 0
    tied[0, 3] = 4.0  # patch 3 is now below the boundary: only it is an untied difference
    assert compare_kept(got, ref, tied, 1e-5)["untied_differences"] == 1


def test_the_boundary_is_the_kth_highest_score():
    got, ref = np.array([[0, 1, 2]]), np.array([[0, 3, 4]])
    scores = np.array([[9.0, 8.0, 6.0, 5.0, 5.0]])  # boundary 6 (3rd highest): only patch 2 is tied with it
    assert compare_kept(got, ref, scores, 1e-5)["untied_differences"] == 3


def test_untied_differences_add_up_over_rows_and_a_gap_at_the_bound_is_a_tie():
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])  # each row: patch 2 is below the boundary (2)
    assert compare_kept(np.array([[0, 1], [0, 1]]), np.array([[0, 2], [0, 2]]), scores, 1e-5)["untied_differences"] == 2
    exact = np.array([[3.0, 2.0, 1.5]])  # 1.5 is 0.25 * 2 below the boundary 2: exactly at the bound
    assert compare_kept(np.array([[0, 1]]), np.array([[0, 2]]), exact, 0.25)["untied_differences"] == 0


def test_tie_eps_is_relative_to_the_boundary_score():
    got, ref = np.array([[0, 1]]), np.array([[0, 2]])
    scores = np.array([[300.0, 200.0, 200.0015]])  # boundary 200.0015: a gap of 0.0015 = 7.5e-6 relative
    assert compare_kept(got, ref, scores, 1e-5)["untied_differences"] == 0
    assert compare_kept(got, ref, scores, 5e-6)["untied_differences"] == 1  # patch 2 is the boundary itself
    small = np.array([[3.0, 0.2, 0.200005]])  # |boundary| < 1: the gap counts absolutely (5e-6 < 1e-5)
    assert compare_kept(got, ref, small, 1e-5)["untied_differences"] == 0
    assert compare_kept(got, ref, small, 4e-6)["untied_differences"] == 1


@pytest.mark.parametrize("idx, violations", [
    ([[3, 2]], 0),  # the top 2 of 4 in descending order
    ([[2, 3]], 2),  # right set, ascending
    ([[3, 1]], 1),  # second is not the 2nd highest
    ([[0, 1]], 2),  # the lowest
])
def test_topk_order_violations_count_positions(idx, violations):
    scores = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert topk_order_violations(np.array(idx), scores, 1e-5) == violations


def test_topk_order_allows_ties_and_counts_every_row():
    scores = np.array([[5.0, 5.0, 1.0], [1.0, 2.0, 3.0]])
    assert topk_order_violations(np.array([[1, 0], [2, 1]]), scores, 1e-5) == 0
    assert topk_order_violations(np.array([[1, 0], [1, 2]]), scores, 1e-5) == 2
    big = np.array([[1000.0, 1000.005, 0.0]])  # relative tie: 0.005 <= 1e-5 * 1000.005
    assert topk_order_violations(np.array([[0, 1]]), big, 1e-5) == 0
    assert topk_order_violations(np.array([[2, 0], [2, 1]]), scores, 1e-5) == 1  # only the first row is wrong
    small = np.array([[1.0, 1.000015]])  # |score| < 2: the gap 1.5e-5 exceeds 1e-5 * max(1, 1.000015)
    assert topk_order_violations(np.array([[0]]), small, 1e-5) == 1
    exact = np.array([[2.0, 1.5]])  # a gap exactly at the bound (0.25 * 2) is a tie
    assert topk_order_violations(np.array([[1]]), exact, 0.25) == 0


def _graph(path, k=2, k_constant=True, topks=1, dims=("batch", 4)):
    """x [dims] -> TopK(k) x topks -> values: a graph with exactly what check_graph looks at."""
    nodes, inits, inputs, src = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))], "x"
    if k_constant:
        inits.append(helper.make_tensor("k", TensorProto.INT64, [1], [k]))
    else:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    for i in range(topks):
        nodes.append(helper.make_node("TopK", [src, "k"], [f"v{i}", f"i{i}"], name=f"topk{i}", axis=-1))
        src = f"v{i}"
    out = helper.make_tensor_value_info(src, TensorProto.FLOAT, [dims[0], k])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _rows(path, expected_topk):
    report = ValidationReport()
    check_graph(report, path, expected_topk)
    return {c["check"]: c["passed"] for c in report.checks}


@pytest.mark.parametrize("kwargs, expected, topk_ok, batch_ok", [
    ({}, 1, True, True),
    ({"topks": 2}, 1, False, True),  # an extra TopK
    ({}, 2, False, True),  # a missing one
    ({"k_constant": False}, 1, False, True),  # K fed at run time, not a graph constant
    ({"k": 3841, "dims": ("batch", 3841)}, 1, False, True),  # over TensorRT's K limit
    ({"k": 3840, "dims": ("batch", 3840)}, 1, True, True),  # at it
    ({"dims": ("batch", "n")}, 1, True, False),  # a second dynamic axis
    ({"dims": (2, 4)}, 1, True, False),  # no dynamic axis at all
])
def test_graph_rows(tmp_path, kwargs, expected, topk_ok, batch_ok):
    rows = _rows(_graph(tmp_path / "g.onnx", **kwargs), expected)
    assert rows["onnx.checker full check"] is True
    assert rows["TopK nodes"] is topk_ok and rows["only batch axis dynamic"] is batch_ok


def test_graph_rows_without_an_expected_topk_count_and_a_broken_graph(tmp_path):
    path = _graph(tmp_path / "g.onnx", topks=3)
    assert "TopK nodes" not in _rows(path, None)
    model = onnx.load(str(path))
    model.graph.node[0].input[0] = "nowhere"  # the checker's full check fails; the other rows still run
    onnx.save(model, str(path))
    rows = _rows(path, 3)
    assert rows["onnx.checker full check"] is False and rows["TopK nodes"] is True
