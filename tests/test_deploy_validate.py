"""`prtool validate`: an export compared with the PyTorch encoder rebuilt from its manifest; refusals
of weights that cannot be rebuilt; engines on TensorRT where it exists."""

import json

import pytest
from conftest import cli
from safetensors.torch import save_file

from prtool.deploy.rebuild import rebuild_encoder
from prtool.deploy.verify import validate_artifact
from prtool.errors import PrtoolError
from prtool.export.validate import PRECISION_TOLERANCES


def test_onnx_validates_against_the_rebuilt_encoder(exported, checkpoint):
    onnx_path, predictor = exported
    res = validate_artifact(onnx_path, pretrained=str(checkpoint))
    assert res["passed"], res["validation"]["checks"]
    assert res["backend"] == "onnxruntime CPUExecutionProvider (fp32)" and res["schedule"] == "1:16,2:16"
    m = res["validation"]["metrics"]
    assert m["image_embeds @ batch 7"]["min_cosine"] >= 0.9999
    assert m["kept_patch_indices @ batch 1"]["untied_differences"] == 0
    assert m["batch_independence_max_abs"] <= 1e-4
    assert res["validation"]["tolerances"]["min_cosine"] == PRECISION_TOLERANCES["fp32"].min_cosine


def test_rebuild_refuses_what_it_cannot_rebuild(exported, checkpoint, tiny, tmp_path):
    from prtool.export.manifest import read_manifest_for

    onnx_path, predictor = exported
    manifest = read_manifest_for(onnx_path)
    with pytest.raises(PrtoolError, match="checkpoint tiny.safetensors .* is not here"):
        rebuild_encoder(manifest)  # the manifest keeps only the file name
    other = tmp_path / "other.safetensors"
    save_file({k: (v + 1).contiguous() for k, v in tiny.model.state_dict().items()}, str(other))
    with pytest.raises(PrtoolError, match="sha256 .* but the export was made from tiny.safetensors"):
        rebuild_encoder(manifest, str(other))
    random = {**manifest, "source": {"model": "prtool-tiny", "pretrained": "none", "checkpoint_sha256": None}}
    with pytest.raises(PrtoolError,
                       match="made for prtool-tiny / tiny.safetensors .*, but the model is prtool-tiny / none"):
        rebuild_encoder(random)  # seeded random weights rebuild; the predictor trained on the checkpoint does not fit
    untrained = {**manifest, "predictor": None}
    with pytest.raises(PrtoolError, match="untrained"):
        rebuild_encoder(untrained, str(checkpoint))
    moved = {**manifest, "predictor": str(tmp_path / "gone.safetensors")}
    with pytest.raises(PrtoolError, match="is not here: pass it with --predictor"):
        rebuild_encoder(moved, str(checkpoint))
    assert rebuild_encoder(moved, str(checkpoint), predictor).output_names == ["image_embeds", "kept_patch_indices"]


def test_validate_cli(capsys, exported, checkpoint, tmp_path):
    onnx_path, _ = exported
    code, out, err = cli(capsys, "validate", onnx_path, "-p", checkpoint, "--json", "-b", "3")
    assert code == 0, err
    res = json.loads(out)
    assert res["passed"] and res["precision"] == "fp32" and "image_embeds @ batch 3" in res["validation"]["metrics"]
    code, out, err = cli(capsys, "validate", onnx_path, "-p", checkpoint, "-q")
    assert code == 0 and out.strip() == str(onnx_path)
    code, out, err = cli(capsys, "validate", onnx_path, "-p", checkpoint)
    assert code == 0 and "passed (fp32 tolerances" in out
    # a failed validation prints its report, then one line on stderr, and exits 2 unless allowed
    code, out, err = cli(capsys, "validate", onnx_path, "-p", checkpoint, "--atol", "0", "--rtol", "0", "--json")
    assert code == 2 and json.loads(out)["passed"] is False
    assert err.strip().splitlines()[-1].startswith("prtool: error: ") and f"validation of {onnx_path} failed" in err
    code, _, _ = cli(capsys, "validate", onnx_path, "-p", checkpoint, "--atol", "0", "--rtol", "0",
                     "--allow-failed-validation", "-q")
    assert code == 0


@pytest.mark.parametrize("args, fragment", [
    (["--provider", "cuda"], "CUDAExecutionProvider is not in this onnxruntime build"),
    (["--precision", "fp16"], "not fp16"),
    (["-b", "1"], "--batch-size >= 2"),
])
def test_validate_cli_errors(capsys, exported, checkpoint, args, fragment):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and "cuda" in args:
        pytest.skip("onnxruntime-gpu is installed here")
    onnx_path, _ = exported
    code, out, err = cli(capsys, "validate", onnx_path, "-p", checkpoint, *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and fragment in lines[0], err


def test_validate_refuses_files_it_cannot_check(capsys, tmp_path, exported):
    onnx_path, _ = exported
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(onnx_path.read_bytes())
    for path, fragment in ((bare, "has no manifest bare.json"), (tmp_path / "m.plan", "does not exist"),
                           (tmp_path / "m.txt", "neither an ONNX file")):
        code, _, err = cli(capsys, "validate", path)
        assert code == 1 and fragment in err, err


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_runs_and_validates(capsys, exported, checkpoint, tmp_path, precision):
    onnx_path, _ = exported
    plan = tmp_path / f"m-{precision}.plan"
    code, out, err = cli(capsys, "build", onnx_path, "-o", plan, "--precision", precision, "--max-batch", "8",
                         "--timing-cache", tmp_path / "cache.bin", "--json")
    assert code == 0, err
    built = json.loads(out)
    assert plan.exists() and (tmp_path / f"m-{precision}.plan.json").exists() and (tmp_path / "cache.bin").exists()
    assert built["precision"] == precision and built["profile"]["max"][0] == 8
    res = validate_artifact(plan, pretrained=str(checkpoint))
    assert res["passed"], res["validation"]["checks"]
    assert res["backend"].startswith("TensorRT ")


@pytest.mark.gpu
def test_onnx_on_the_cuda_provider(exported, checkpoint):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    onnx_path, _ = exported
    res = validate_artifact(onnx_path, provider="cuda", pretrained=str(checkpoint))
    assert res["passed"] and "CUDAExecutionProvider" in res["backend"]
