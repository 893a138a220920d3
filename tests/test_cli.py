"""The CLI's contract: results on stdout, one-line errors on stderr, non-zero exits, no stray files."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import cli
from safetensors.torch import save_file


def assert_user_error(code, err, *fragments):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("prtool: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_and_env_run_as_a_subprocess():
    help_ = subprocess.run([sys.executable, "-m", "prtool", "--help"], capture_output=True, text=True, timeout=600)
    assert help_.returncode == 0 and "export" in help_.stdout and "inspect" in help_.stdout
    env = subprocess.run([sys.executable, "-m", "prtool", "env", "--json"], capture_output=True, text=True, timeout=600)
    assert env.returncode == 0, env.stderr
    info = json.loads(env.stdout)
    assert info["torch"] and "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert "tensorrt" in info  # None where TensorRT is missing: reported, not fatal


def test_export_and_inspect_json(capsys, tmp_path):
    out = tmp_path / "e" / "m.onnx"
    code, stdout, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", "none", "--keep-ratio", "0.5", "--stages", "2",
                            "--scorer", "cls-attn", "--with-kept-indices", "-o", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["validation"]["passed"] and res["schedule"] == "1:16,2:16"
    code, stdout, _ = cli(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["topk"][0]["k"] == 48 and info["tensorrt_readiness"]["ready"]
    assert info["manifest"]["source"]["model"] == "prtool-tiny"
    code, stdout, _ = cli(capsys, "inspect", out)
    assert code == 0 and "TensorRT 10 readiness: ready" in stdout


def test_quiet_prints_only_the_path(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, _ = cli(capsys, "export", "-m", "prtool-tiny", "-p", "none", "--no-prune", "-o", out, "-q")
    assert code == 0 and stdout.strip() == str(out)


def _bad_export(capsys, tmp_path, *args, out_name="m.onnx"):
    out = tmp_path / "out" / out_name
    code, _, err = cli(capsys, "export", "-o", out, *args)
    assert not out.exists() and not out.with_suffix(".json").exists()
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == [], leftovers
    return code, err


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["-m", "ViT-Q-99"], ["unknown model 'ViT-Q-99'"]),
        (["-m", "prtool-tiny-rn", "-p", "none"], ["ModifiedResNet", "ViT towers only"]),
        (["-m", "prtool-tiny", "-p", "none", "-s", "1:0"], ["at least one token"]),
        (["-m", "prtool-tiny", "-p", "none", "-s", "1:64"], ["at least one patch token must be kept"]),
        (["-m", "prtool-tiny", "-p", "none", "-s", "4:8"], ["outside 0..3"]),
        (["-m", "prtool-tiny", "-p", "none", "-s", "2:8,1:8"], ["increase strictly"]),
        (["-m", "prtool-tiny", "-p", "none", "-s", "2;8"], ["malformed"]),
        (["-m", "prtool-tiny", "-p", "none", "--opset", "13"], ["--opset 13", "17"]),
        (["-m", "prtool-tiny", "-p", "/nonexistent/w.safetensors"], ["does not exist"]),
        (["-m", "ViT-B-16", "-p", "nosuchtag"], ["unknown pretrained tag 'nosuchtag'"]),
        (["-m", "prtool-tiny", "-p", "none", "-s", "1:8", "--scorer", "random"], ["cannot be exported"]),
    ],
)
def test_bad_export_input(capsys, tmp_path, args, fragments):
    code, err = _bad_export(capsys, tmp_path, *args)
    assert_user_error(code, err, *fragments)


def test_bad_checkpoints(capsys, tmp_path, tiny):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch_trunc = tmp_path / "trunc.pt"
    torch.save(state, torch_trunc)
    torch_trunc.write_bytes(torch_trunc.read_bytes()[:1000])
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint\n")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Payload()}, evil_zip)
    other = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(other))
    cases = [
        (truncated, ["not a readable safetensors file"]),
        (torch_trunc, ["not a readable torch checkpoint"]),
        (text, ["not a readable torch checkpoint"]),
        (evil, ["pickled code"]),
        (evil_zip, ["pickled code"]),
        (other, ["does not fit model 'prtool-tiny'"]),
    ]
    for path, fragments in cases:
        code, err = _bad_export(capsys, tmp_path, "-m", "prtool-tiny", "-p", path)
        assert_user_error(code, err, str(path), *fragments)
    code, stdout, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", good, "--no-prune", "-o", tmp_path / "ok.onnx",
                            "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "ok.json").read_text())["source"]["checkpoint_sha256"]


def test_predictor_for_another_model_is_refused(capsys, tmp_path):
    from prtool.encoder.predictor import PredictorConfig, RankingPredictor, save_predictor

    pred = tmp_path / "pred.safetensors"
    save_predictor(RankingPredictor(PredictorConfig(196, 128)), pred,
                   {"model_id": {"model": "testbed", "checkpoint_sha256": "abc"}, "rank_block": 1})
    code, err = _bad_export(capsys, tmp_path, "-m", "prtool-tiny", "-p", "none", "-s", "1:16", "--predictor", pred)
    assert_user_error(code, err, "trained for model 'testbed', not 'prtool-tiny'")
    save_predictor(RankingPredictor(PredictorConfig(196, 128)), pred, {"model_id": {}, "rank_block": 1})
    code, err = _bad_export(capsys, tmp_path, "-m", "prtool-tiny", "-p", "none", "-s", "1:16", "--predictor", pred)
    assert_user_error(code, err, "num_patches=196", "num_patches=64")
    save_predictor(RankingPredictor(PredictorConfig(64, 32)), pred, {"model_id": {}, "rank_block": 2})
    code, err = _bad_export(capsys, tmp_path, "-m", "prtool-tiny", "-p", "none", "-s", "1:16", "--predictor", pred)
    assert_user_error(code, err, "rank_block=2", "rank_block=1")


def test_bad_images(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _bad_export(capsys, tmp_path, "-m", "prtool-tiny", "-p", "none", "--images", empty)
    assert_user_error(code, err, "holds no images")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.new("RGB", (80, 60), (200, 10, 10)).save(imgs / "a.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    code, err = _bad_export(capsys, tmp_path, "-m", "prtool-tiny", "-p", "none", "--images", imgs)
    assert_user_error(code, err, "broken.jpg")
    (imgs / "broken.jpg").unlink()
    code, _, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", "none", "-s", "1:8", "--scorer", "cls-attn",
                       "--images", imgs, "-o", tmp_path / "fine.onnx")
    assert code == 0, err  # one image is extended with mirrored copies to fill the batch


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", "none", "-o", blocker / "sub" / "m.onnx")
    assert_user_error(code, err, "cannot create output directory")


def test_failed_validation_leaves_no_file_unless_allowed(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, _, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", "none", "--atol", "0", "--rtol", "0", "-o", out)
    # Exact zero tolerance fails on float round-off: a table on stderr, then the one-line error.
    assert code == 2 and "validation of the export failed" in err.strip().splitlines()[-1]
    assert not out.exists()
    code, _, err = cli(capsys, "export", "-m", "prtool-tiny", "-p", "none", "--atol", "0", "--rtol", "0", "-o", out,
                       "--allow-failed-validation")
    assert code == 0 and out.exists()
    assert json.loads(out.with_suffix(".json").read_text())["validation"]["passed"] is False


def test_tune_refuses_a_context_longer_than_the_text_tower_holds(capsys, tmp_path):
    code, out, err = cli(capsys, "tune", "-m", "testbed", "-d", "testbed", "--n-ctx", "12", "-s", "1:20",
                         "--scorer", "cls-attn", "-o", tmp_path / "t.safetensors")
    assert_user_error(code, err, "--n-ctx 12 does not fit", "use --n-ctx 9 or fewer")
    assert not list(tmp_path.iterdir())
