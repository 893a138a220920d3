"""The demo (what `make demo` runs), on a slice of the shipped eval images."""

import json

from conftest import cli


def test_demo_reports_every_variant(capsys, tmp_path):
    from prtool.testbed import spec

    code, out, err = cli(capsys, "demo", "--limit", "48", "--latency-batch", "4", "--latency-iters", "2", "-o",
                         tmp_path / "demo", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    rows = report["variants"]
    expected = ({"unpruned", "pruned", "patch-ranking", "evit", "tome"}
                | ({"pruned+tokens"} if spec.TOKENS_PATH.exists() else set()))
    assert set(rows) == expected
    assert all(r["validation_passed"] for r in rows.values())
    assert report["eval_images"] == 48 and all(r["accuracy"]["images"] == 48 for r in rows.values())
    # every pruned variant sees the same tokens in its last block and costs less than the unpruned one
    last = {n: r["cost"]["tokens_per_block"][-1] for n, r in rows.items()}
    assert last["unpruned"] == 197 and len({last[n] for n in ("pruned", "patch-ranking", "evit", "tome")}) == 1
    assert all(r["cost"]["gmacs"] < rows["unpruned"]["cost"]["gmacs"] for n, r in rows.items() if n != "unpruned")
    assert report["scorer"] == "patch-ranking-merge"  # the default pruned export is rank-and-merge
    if "pruned+tokens" in rows:
        assert rows["pruned+tokens"]["accuracy"]["head"] == "onnx logits"
    for name in ("report.json", "report.md", "kept_patches.png", "pruned.onnx", "pruned.json"):
        assert (tmp_path / "demo" / name).exists()
    assert "pruned+tokens" not in rows or "| pruned+tokens |" in (tmp_path / "demo" / "report.md").read_text()
