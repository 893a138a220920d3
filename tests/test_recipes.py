"""Recipes cannot be accepted and then ignored: every key of ``[export]`` and ``[build]`` (the fields of
``ExportRequest`` / ``BuildRequest``) is set in a recipe alone, the command runs on the tiny model, and the
result shows the key's effect; unknown keys and values of the wrong kind are one-line errors."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from cli_artifacts import TINY, artifacts  # noqa: F401 - artifacts is a fixture
from conftest import cli

from prtool.deploy.build_request import BuildRequest
from prtool.export.request import ExportRequest
from prtool.util.files import sha256_file
from prtool.util.recipes import recipe_keys

DROP = object()  # a base key the case removes from the recipe
OUTPUT_ONLY = {"ctx", "recipe", "as_json", "quiet", "verbose"}  # how to print, not what to do: not recipe keys


def toml_value(v) -> str:
    return json.dumps(str(v) if not isinstance(v, (bool, int, float)) else v)


def write_recipe(path, section: str, table: dict):
    path.write_text(f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items() if v is not DROP))
    return path


def outputs(m):
    return [o["name"] for o in m["outputs"]]


QDQ = {"quantize": "int8-qdq", "calib_images": 4}  # a calibrated export: what the --calib-* keys act on
# key -> (value, other keys of the case (over the base), check(exit code, summary, manifest, stderr, artifacts))
EXPORT_CASES = {
    "model": ("prtool-tiny", {}, lambda c, s, m, e, a: m["source"]["model"] == "prtool-tiny"),
    "pretrained": ("CHECKPOINT", {"scorer": "cls-attn", "predictor": DROP},
                   lambda c, s, m, e, a: m["source"]["checkpoint_sha256"] is not None),
    "schedule": ("1:8", {}, lambda c, s, m, e, a: m["schedule"]["string"] == "1:8"),
    "keep_ratio": (0.5, {"schedule": DROP, "scorer": "cls-attn", "predictor": DROP},
                   lambda c, s, m, e, a: m["schedule"]["final_keep"] == 32),
    "stages": (2, {"schedule": DROP, "keep_ratio": 0.5, "scorer": "cls-attn", "predictor": DROP},
               lambda c, s, m, e, a: len(m["schedule"]["stages"]) == 2),
    "first_block": (2, {"schedule": DROP, "keep_ratio": 0.5, "scorer": "cls-attn", "predictor": DROP},
                    lambda c, s, m, e, a: m["schedule"]["stages"][0]["block"] == 2),
    "scorer": ("cls-attn", {"predictor": DROP}, lambda c, s, m, e, a: m["scorer"] == "cls-attn"),
    "predictor": ("PREDICTOR", {}, lambda c, s, m, e, a: m["predictor_sha256"] == sha256_file(a.predictor)),
    "out": ("OUT", {}, lambda c, s, m, e, a: c == 0 and s["onnx"].endswith("recipe-out/m.onnx")),
    "opset": (17, {}, lambda c, s, m, e, a: m["opset"] == 17),
    "exporter": ("bogus", {}, lambda c, s, m, e, a: c == 1 and "unknown exporter 'bogus'" in e),
    "gather": ("elements", {}, lambda c, s, m, e, a: m["gather"] == "elements"),
    "no_normalize": (True, {}, lambda c, s, m, e, a: m["outputs"][0]["l2_normalized"] is False),
    "with_kept_indices": (True, {}, lambda c, s, m, e, a: "kept_patch_indices" in outputs(m)),
    "no_prune": (True, {"predictor": DROP}, lambda c, s, m, e, a: m["pruned"] is False),
    "no_validate": (True, {}, lambda c, s, m, e, a: c == 0 and m["validation"] is None),
    "allow_failed_validation": (True, {"atol": 0.0, "rtol": 0.0},
                                lambda c, s, m, e, a: c == 0 and m["validation"]["passed"] is False),
    "images": ("IMAGES", {}, lambda c, s, m, e, a: str(a.images) in m["validation"]["images"]),
    "batch_size": (3, {}, lambda c, s, m, e, a: "image_embeds @ batch 3" in m["validation"]["metrics"]),
    "atol": (0.5, {}, lambda c, s, m, e, a: m["validation"]["tolerances"]["atol"] == 0.5),
    "rtol": (0.25, {}, lambda c, s, m, e, a: m["validation"]["tolerances"]["rtol"] == 0.25),
    "tokens": ("TOKENS", {}, lambda c, s, m, e, a: m["tokens"]["sha256"] == sha256_file(a.tokens)),
    "classifier": (True, {"data": "testbed"}, lambda c, s, m, e, a: "logits" in outputs(m)),
    "data": ("testbed", {"classifier": True}, lambda c, s, m, e, a: m["classifier_data"] == "testbed"),
    "allow_other_weights": (True, {"pretrained": "CHECKPOINT"},
                            lambda c, s, m, e, a: c == 0 and m["allow_other_weights"] is True),
    "quantize": ("int8-dynamic", {}, lambda c, s, m, e, a: m["quantization"]["mode"] == "int8-dynamic"),
    "calib_data": ("testbed", QDQ, lambda c, s, m, e, a: m["quantization"]["calibration"]["dataset"] == "testbed"),
    "calib_split": ("test", {**QDQ, "calib_data": "testbed"},
                    lambda c, s, m, e, a: m["quantization"]["calibration"]["split"] == "test"),
    "calib_images": (3, {**QDQ, "calib_data": "testbed"},
                     lambda c, s, m, e, a: m["quantization"]["calibration"]["images"] == 3),
    "calib_seed": (5, {**QDQ, "calib_data": "testbed"},
                   lambda c, s, m, e, a: m["quantization"]["calibration"]["seed"] == 5),
}
EXPORT_BASE = {"model": "prtool-tiny", "pretrained": "none", "schedule": "1:16", "scorer": "predictor",
               "predictor": "PREDICTOR", "out": "OUT"}

# key -> (value, other keys, check(exit code, result, stderr, tmp_path))
BUILD_CASES = {
    "out": ("ENGINE", {}, lambda c, r, e, t: r["engine"] == str(t / "e.plan")),
    "precision": ("fp32", {}, lambda c, r, e, t: r["config"]["precision"] == "fp32"),
    "min_batch": (2, {}, lambda c, r, e, t: r["config"]["profile"]["min"][0] == 2),
    "opt_batch": (4, {}, lambda c, r, e, t: r["config"]["profile"]["opt"][0] == 4),
    "max_batch": (16, {}, lambda c, r, e, t: r["config"]["profile"]["max"][0] == 16),
    "timing_cache": ("CACHE", {}, lambda c, r, e, t: r["config"]["timing_cache"] == str(t / "t.cache")),
    "strongly_typed": (True, {"trt_version": 10}, lambda c, r, e, t: r["config"]["strongly_typed"] is True),
    "trt_version": (10, {}, lambda c, r, e, t: r["config"]["tensorrt_major"] == 10),
    "mixed_onnx_only": (True, {"precision": "fp16", "trt_version": 11},
                        lambda c, r, e, t: c == 0 and (t / "e.fp16.onnx").is_file() and "mixed_onnx" in r),
    "no_fp32_norm": (True, {}, lambda c, r, e, t: r["config"]["fp32_norm"] is False),
    "workspace": (64, {}, lambda c, r, e, t: r["config"]["workspace_mib"] == 64),
    "dry_run": (True, {}, lambda c, r, e, t: c == 0 and r["dry_run"] is True),
}
BUILD_BASE = {"dry_run": True, "out": "ENGINE"}


def fill(table: dict, subs: dict) -> dict:
    return {k: subs.get(v, v) if isinstance(v, str) else v for k, v in table.items()}


def test_every_field_has_an_effect_case_and_a_cli_option():
    from prtool.cli.deploy_cmd import build
    from prtool.cli.export_cmd import export

    assert sorted(EXPORT_CASES) == sorted(recipe_keys(ExportRequest)), "give each new export option a case"
    assert sorted(BUILD_CASES) == sorted(recipe_keys(BuildRequest)), "give each new build option a case"
    for command, cls in ((export, ExportRequest), (build, BuildRequest)):
        names = set(inspect.signature(command).parameters) - OUTPUT_ONLY
        assert names == {f.name for f in dataclasses.fields(cls)}, command.__name__


@pytest.mark.parametrize("key", sorted(EXPORT_CASES))
def test_every_export_recipe_key_takes_effect(capsys, artifacts, checkpoint, tmp_path, monkeypatch, key):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # a default output path, if the recipe were ignored, lands here
    value, others, check = EXPORT_CASES[key]
    subs = {"PREDICTOR": str(artifacts.predictor), "TOKENS": str(artifacts.tokens), "IMAGES": str(artifacts.images),
            "CHECKPOINT": str(checkpoint), "OUT": str(tmp_path / "recipe-out" / "m.onnx")}
    recipe = write_recipe(tmp_path / "r.toml", "export", fill({**EXPORT_BASE, **others, key: value}, subs))
    code, out, err = cli(capsys, "export", "--recipe", recipe, "--json")
    summary = json.loads(out) if code == 0 else {}
    manifest = json.loads((tmp_path / "recipe-out" / "m.json").read_text()) if code == 0 else {}
    assert check(code, summary, manifest, err, artifacts), (key, code, err[-400:])


@pytest.mark.parametrize("key", sorted(BUILD_CASES))
def test_every_build_recipe_key_takes_effect(capsys, artifacts, tmp_path, key):  # noqa: F811
    value, others, check = BUILD_CASES[key]
    subs = {"ENGINE": str(tmp_path / "e.plan"), "CACHE": str(tmp_path / "t.cache")}
    recipe = write_recipe(tmp_path / "r.toml", "build", fill({**BUILD_BASE, **others, key: value}, subs))
    code, out, err = cli(capsys, "build", artifacts.onnx, "--recipe", recipe, "--json")
    result = json.loads(out) if code == 0 else {}
    assert check(code, result, err, tmp_path), (key, code, err[-400:])


@pytest.mark.parametrize("command, section, table, fragment", [
    ("export", "export", {"batchsize": 3}, "unknown keys ['batchsize']"),
    ("export", "export", {"quiet": True}, "unknown keys ['quiet']"),  # output modes are flags, not recipe keys
    ("export", "export", {"batch_size": "3"}, "batch_size = '3' must be of type int"),
    ("export", "export", {"no_prune": 1}, "no_prune = 1 must be of type bool"),
    ("export", "export", {"gather": 3}, "gather = 3 must be of type str"),
    ("build", "build", {"onnx": "x.onnx"}, "unknown keys ['onnx']"),  # the positional argument
    ("build", "build", {"precison": "fp16"}, "unknown keys ['precison']"),
])
def test_unknown_keys_and_wrong_kinds_are_one_line_errors(capsys, artifacts, tmp_path, command, section, table,  # noqa: F811
                                                        fragment):
    recipe = write_recipe(tmp_path / "r.toml", section, table)
    args = [command, *TINY, "-o", tmp_path / "m.onnx"] if command == "export" else [command, artifacts.onnx]
    code, out, err = cli(capsys, *args, "--recipe", recipe, "--dry-run" if command == "build" else "--no-validate")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and fragment in lines[0], err
    assert not (tmp_path / "m.onnx").exists()
