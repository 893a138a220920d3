"""The user path (issue 13): what a new user meets in the first hour, each defect pinned by a test."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_artifacts import TINY, artifacts, run  # noqa: F401 - artifacts is a fixture
from PIL import Image
from safetensors.torch import save_file

S = ("-s", "1:16")


def _error_line(code, out, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == "" and len(lines) == 1 and lines[0].startswith("prtool: error: "), (code, out, err)
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model's seeded random weights saved as a checkpoint file (other weights than ``-p none``)."""
    from prtool.encoder.models import load_clip

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in load_clip("prtool-tiny", "none").model.state_dict().items()}, str(path))
    return path


# 1. `train` in table mode (also in test_cli_matrix) and 2. missing output folders are created
def test_train_prints_a_table_into_a_folder_that_does_not_exist_yet(artifacts, tmp_path):  # noqa: F811
    out = tmp_path / "no" / "such" / "dir" / "p.safetensors"
    code, stdout, err = run("train", "-r", artifacts.rankings, *TINY, "-d", "testbed", "--split", "test",
                            "--epochs", "1", "-o", out)
    assert code == 0, err
    assert out.exists() and "parameters" in stdout and "match@" in stdout


# 2. every command checks its output path before any work: the bad model name is never reached
@pytest.mark.parametrize("args", [
    ["export", "-o", "{blocked}/m.onnx"], ["rank", "-o", "{blocked}/rk"],
    ["train", "-r", "x", "-o", "{blocked}/p.safetensors"],
    ["show", "-o", "{blocked}/s.png"], ["tune", "-o", "{blocked}/t.safetensors"],
    ["export-text", "-o", "{blocked}/t.onnx"], ["bench", "accuracy", "-s", "1:8", "-o", "{blocked}/b"],
    ["bench", "speed", "-o", "{blocked}/b"], ["bench", "prompts", "-o", "{blocked}/b"], ["demo", "-o", "{blocked}/d"],
    ["testbed", "data", "-o", "{blocked}/d"], ["testbed", "train", "-o", "{blocked}/t.safetensors"],
    ["package", "--triton", "{blocked}/tri", "{onnx}"],
], ids=lambda a: " ".join(a[:2]))
def test_unwritable_output_is_refused_before_work(artifacts, tmp_path, args):  # noqa: F811
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [a.format(blocked=blocker / "sub", onnx=artifacts.onnx) for a in args]
    if argv[0] not in ("package", "demo", "testbed"):
        argv += ["-m", "ViT-Q-99"]  # would fail loading if the output were checked after the model
    if argv[0] == "testbed":
        argv += ["--idx-dir", str(tmp_path / "no-idx")]  # would fail reading if checked after the data
    _error_line(*run(*argv), "cannot create output directory", str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# 3. split folders are splits; a flat class-folder tree says it has none
def _image_tree(root, splits):
    for split in splits:
        for name, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (64, 64), color).save(folder / f"{i}.png")


def test_split_folders_are_splits(tmp_path):
    data = tmp_path / "data"
    _image_tree(data, ["train", "val"])
    _error_line(*run("eval", *TINY, "-d", data), "has no 'test' split (it has train, val)", "--split train")
    code, out, err = run("eval", *TINY, "-d", data, "--split", "val", "--json")
    res = json.loads(out)
    assert code == 0 and res["images"] == 4 and "dataset_notes" not in res
    from prtool.data.datasets import load_dataset

    assert load_dataset(str(data), "val").classnames == ["cat", "dog"]


@pytest.mark.parametrize("command", [
    ["eval"], ["rank", "-o", "{tmp}/rk", "--stride", "2"],
    ["tune", "--shots", "1", "--epochs", "1", "--scorer", "cls-attn",
                                                            "-s", "1:16", "-o", "{tmp}/t.safetensors", "--eval-split",
                                                            ""],
], ids=lambda c: c[0])
def test_a_flat_class_folder_tree_says_it_has_no_splits(tmp_path, command):
    data = tmp_path / "data"
    _image_tree(data, [None])
    argv = [c.format(tmp=tmp_path) for c in command] + [*TINY, "-d", data, "--json"]
    code, out, err = run(*argv)
    assert code == 0, err
    note = json.loads(out)["dataset_notes"][0]
    assert "flat class-folder tree without train/val/test folders" in note
    assert "flat class-folder tree" in err  # and in the log


# 4. a predictor is never ignored nor silently untrained
def test_predictor_without_a_schedule_is_refused(artifacts, tmp_path):  # noqa: F811
    _error_line(*run("export", *TINY, "--predictor", artifacts.predictor, "-o", tmp_path / "m.onnx"),
                "needs a pruning schedule", "--schedule")
    assert list(tmp_path.iterdir()) == []


def test_an_untrained_predictor_is_said_and_recorded(tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run("export", *TINY, *S, "--no-validate", "-o", out, "--json")
    assert code == 0 and "untrained (seeded random) predictor" in err
    assert json.loads(out.with_suffix(".json").read_text())["predictor"] == "untrained"
    assert json.loads(stdout)["predictor"] == "untrained"


def test_the_testbed_defaults_to_its_shipped_predictor(tmp_path):
    from prtool.testbed import spec

    out = tmp_path / "m.onnx"
    code, stdout, err = run("export", "-m", "testbed", "-s", "1:40", "--no-validate", "-o", out, "--json")
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert code == 0 and manifest["predictor"] == str(spec.PREDICTOR_PATH) and "untrained" not in err
    assert manifest["predictor_sha256"] and manifest["predictor_meta"]["rank_block"] == 1
    code, stdout, err = run("export", "-m", "testbed", "-s", "3:40", "--no-validate", "-o", out, "--json")
    assert code == 0 and "ranks at block 1, this schedule starts at block 3" in err
    assert json.loads(out.with_suffix(".json").read_text())["predictor"] == "untrained"


# 5. a predictor or tokens made for other weights are refused, naming both, unless explicitly allowed
def test_weights_provenance_of_predictor_and_tokens(artifacts, checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "m.onnx"
    line = _error_line(*run("export", "-m", "prtool-tiny", "-p", checkpoint, *S, "--predictor", artifacts.predictor,
                            "-o", out), "made for prtool-tiny / none",
                            "but the model is prtool-tiny / tiny.safetensors",
                       "--allow-other-weights")
    assert "sha256" in line
    code, _, err = run("export", "-m", "prtool-tiny", "-p", checkpoint, *S, "--predictor", artifacts.predictor,
                       "--allow-other-weights", "--no-validate", "-o", out)
    assert code == 0 and json.loads(out.with_suffix(".json").read_text())["allow_other_weights"] is True
    assert "used anyway (--allow-other-weights)" in err
    out.unlink()
    out.with_suffix(".json").unlink()
    _error_line(*run("export", "-m", "prtool-tiny", "-p", checkpoint, *S, "--scorer", "cls-attn", "--tokens",
                     artifacts.tokens, "-o", out), f"tokens {artifacts.tokens} was made for prtool-tiny / none")
    _error_line(*run("export-text", "-m", "prtool-tiny", "-p", checkpoint, "--tokens", artifacts.tokens, "-o", out),
                "made for prtool-tiny / none")
    assert not out.exists()


def test_an_open_clip_tag_is_compared_too():
    from prtool.encoder.predictor import check_predictor_fits
    from prtool.errors import PrtoolError

    meta = {"predictor": {"num_patches": 64, "dim": 32}, "rank_block": 1,
            "model_id": {"model": "prtool-tiny", "pretrained": "openai", "checkpoint_sha256": None}}
    here = {"model": "prtool-tiny", "pretrained": "none", "checkpoint_sha256": None}
    with pytest.raises(PrtoolError, match="made for prtool-tiny / openai, but the model is prtool-tiny / none"):
        check_predictor_fits(meta, here, 1, 64, 32, "p.safetensors")
    assert check_predictor_fits(meta, here, 1, 64, 32, "p.safetensors", allow_other_weights=True) is False
    assert check_predictor_fits(meta, {**here, "pretrained": "openai"}, 1, 64, 32, "p.safetensors") is True


# 7. validate and package check the graph against its manifest; validate reads Triton copies and `-p none`
def test_a_graph_that_is_not_its_manifests_is_refused(artifacts, tmp_path):  # noqa: F811
    x = tmp_path / "x.onnx"
    shutil.copy(artifacts.onnx, x)
    shutil.copy(artifacts.onnx.with_suffix(".json"), x.with_suffix(".json"))
    code, _, err = run("export", *TINY, "--no-prune", "--no-validate", "-o", tmp_path / "y.onnx", "-q")
    assert code == 0, err
    shutil.copy(tmp_path / "y.onnx", x)  # an unpruned graph beside a pruned export's manifest
    _error_line(*run("validate", x), "x.onnx (sha256", "is not the graph its manifest", "x.json")
    _error_line(*run("package", "--triton", tmp_path / "tri", x), "is not the graph its manifest")
    assert not (tmp_path / "tri").exists() or list((tmp_path / "tri").iterdir()) == []


def test_validate_reads_the_copy_in_a_triton_repository(artifacts, tmp_path):  # noqa: F811
    code, _, err = run("package", "--triton", tmp_path / "tri", artifacts.onnx, "--name", "enc")
    assert code == 0, err
    code, out, err = run("validate", tmp_path / "tri" / "enc" / "1" / "model.onnx", "-b", "2", "--json")
    assert code == 0 and json.loads(out)["passed"], err


def test_random_weights_and_an_untrained_predictor_validate(tmp_path):
    out = tmp_path / "m.onnx"
    assert run("export", *TINY, *S, "--with-kept-indices", "--no-validate", "-o", out, "-q")[0] == 0
    code, stdout, err = run("validate", out, "-b", "2", "--json")
    assert code == 0 and json.loads(stdout)["passed"], err


# 8. Phase-III exports validate: the classifier head and the baked-in tokens are rebuilt from the manifest
def test_classifier_and_tokens_exports_validate(artifacts, tmp_path):  # noqa: F811
    for name, extra in (("c", ["--classifier", "-d", "testbed"]),
                        ("t", ["--tokens", artifacts.tokens, "--classifier"])):
        out = tmp_path / f"{name}.onnx"
        code, _, err = run("export", *TINY, *S, "--predictor", artifacts.predictor, *extra, "-o", out, "-q")
        assert code == 0, err
        code, stdout, err = run("validate", out, "-b", "2", "--json")
        res = json.loads(stdout)
        assert code == 0 and res["passed"], err
        metrics = res["validation"]["metrics"]
        assert "logits @ batch 2" in metrics and "image_embeds @ batch 2" in metrics


# 9. messages and output
def test_the_wrong_kind_of_weights_file_is_named(artifacts, tmp_path):  # noqa: F811
    _error_line(*run("export", "-m", "prtool-tiny", "-p", artifacts.onnx, "-o", tmp_path / "m.onnx"),
                "is an ONNX graph, not weights")
    line = _error_line(*run("export", *TINY, *S, "--predictor", artifacts.onnx, "-o", tmp_path / "m.onnx"),
                       "is an ONNX graph")
    assert "mapping" not in line


def test_inspect_refuses_an_empty_file(tmp_path):
    empty = tmp_path / "e.onnx"
    empty.touch()
    _error_line(*run("inspect", empty), "is empty")


def test_export_json_prints_the_failed_validation(tmp_path):
    code, out, err = run("export", *TINY, "--no-prune", "--atol", "0", "--rtol", "0", "-o", tmp_path / "m.onnx",
                         "--json")
    res = json.loads(out)
    assert code == 2 and res["passed"] is False and res["validation"]["checks"]
    assert err.strip().splitlines()[-1].startswith("prtool: error: validation of the export failed")
    assert list(tmp_path.iterdir()) == []


def test_tables_are_readable(artifacts, tmp_path):  # noqa: F811
    code, out, _ = run("package", "--triton", tmp_path / "tri", artifacts.onnx)
    row = next(line for line in out.splitlines() if "in: pixel_values" in line)
    assert code == 0 and "float32" in row and "[3, 64, 64]" in row and "['" not in out
    code, out, _ = run("build", "--help")
    assert code == 0 and "[build]" in out
    code, out, err = run("bench", "accuracy", *TINY, "-d", "testbed", "--limit", "4", *S, "--methods", "none,random",
                         "--seeds", "0", "-o", tmp_path / "ba")
    assert code == 0, err
    assert max(len(line) for line in out.splitlines() if not line.startswith("report in")) <= 100, out


def test_written_files_follow_the_umask(artifacts, tmp_path):  # noqa: F811
    old = os.umask(0o022)
    try:
        out = tmp_path / "p.safetensors"
        code, _, err = run("train", "-r", artifacts.rankings, *TINY, "-d", "testbed", "--split", "test",
                           "--epochs", "1", "-o", out, "-q")
        assert code == 0, err
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert oct(out.with_suffix(".json").stat().st_mode & 0o777) == oct(0o644)


def test_a_schedule_syntax_error_comes_before_the_model_loads(tmp_path):
    # ViT-Q-99 does not exist: reaching the model would say so instead
    _error_line(*run("export", "-m", "ViT-Q-99", "-s", "3;20", "-o", tmp_path / "m.onnx"), "malformed")
    _error_line(*run("eval", "-m", "ViT-Q-99", "-s", "3:x"), "malformed")


def test_loading_the_testbed_from_python_is_quiet(caplog):
    from prtool.encoder.models import load_clip

    with caplog.at_level("WARNING"):
        load_clip("testbed")
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
