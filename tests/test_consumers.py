"""The consumers outside Python against prtool's Python onnxruntime: export/cpp's prtool-embed (ONNX
Runtime and OpenVINO), export/web's page in headless Chromium and its Node script (onnxruntime-web).

Three testbed exports (unpruned, pruned with kept indices, learned tokens + classifier head) run on
34 shipped eval canvases (the model's size) and on images of other sizes, aspect ratios and kinds
(PNG RGBA/palette, JPEG colour/gray, up- and downscaled). A toolchain missing on a developer's machine
skips its test with the install command; under CI (CI=true) it fails.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from prtool.deploy import consumers
from prtool.errors import PrtoolError

pytestmark = pytest.mark.slow
ASSETS = "prtool/testbed/assets"
SCHEDULE = "1:20,2:20,3:19,4:19"
EXPORTS = {  # name -> `prtool export` options (README); each keeps what its consumers must show
    "unpruned": ["--no-prune"],
    "pruned": ["-s", SCHEDULE, "--predictor", f"{ASSETS}/predictor.safetensors", "--with-kept-indices"],
    "tokens+classifier": ["-s", SCHEDULE, "--predictor", f"{ASSETS}/predictor.safetensors", "--with-kept-indices",
                          "--tokens", f"{ASSETS}/tokens.safetensors", "--classifier"],
}
EVAL_IMAGES = 34
ATOL = 1e-4


@pytest.fixture(scope="module")
def toolchains():
    return consumers.missing_toolchains()


def require(toolchains, name):
    why = toolchains.get(name)
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"the {name} consumer cannot run under CI: {why}")
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """34 eval canvases as PNG (the model's size), then 7 images the consumers must resize themselves."""
    from prtool.testbed.eval_set import load_eval_canvases

    out = tmp_path_factory.mktemp("images")
    canvases, _ = load_eval_canvases(limit=EVAL_IMAGES)
    paths = []
    for i, c in enumerate(canvases):
        paths.append(out / f"eval_{i:03d}.png")
        Image.fromarray(c).save(paths[-1])
    pair = Image.fromarray(np.concatenate([canvases[0], canvases[1]], axis=1))
    others = {  # downscaled, upscaled, odd sizes, gray/alpha/palette, JPEG
        "wide_317x158.png": pair.resize((317, 158), Image.BICUBIC),
        "tall_150x263.jpg": Image.fromarray(canvases[2]).resize((150, 263), Image.BILINEAR),
        "small_64x80.png": Image.fromarray(canvases[3]).resize((64, 80), Image.BICUBIC),
        "odd_115x111.png": Image.fromarray(canvases[4]).resize((115, 111)),
        "gray_500x375.jpg": Image.fromarray(canvases[5]).convert("L").resize((500, 375)),
        "rgba_333x333.png": Image.fromarray(canvases[6]).convert("RGBA").resize((333, 333)),
        "palette_200x120.png": Image.fromarray(canvases[7]).resize((200, 120)).convert("P"),
    }
    for name, img in others.items():
        paths.append(out / name)
        img.save(paths[-1], quality=90) if name.endswith(".jpg") else img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from prtool.cli.app import app

    out = tmp_path_factory.mktemp("exports")
    paths = {}
    for name, options in EXPORTS.items():
        paths[name] = out / f"{name.replace('+', '-')}.onnx"
        result = CliRunner().invoke(app, ["export", "-m", "testbed", *options, "--no-validate", "-q", "-o",
                                          str(paths[name])])
        assert result.exit_code == 0, result.output
    return paths


@pytest.fixture(scope="module")
def reference(exports, images):
    """prtool's Python side: pixels (Pillow) and onnxruntime outputs, plus zero-shot class embeddings."""
    import onnxruntime as ort

    from prtool.data.datasets import load_dataset
    from prtool.data.images import load_image_batch
    from prtool.data.zeroshot import text_classifier
    from prtool.encoder.models import load_clip

    classes = text_classifier(load_clip("testbed", None), load_dataset("testbed", "test")).numpy()
    refs = {}
    for name, onnx in exports.items():
        manifest = json.loads(onnx.with_suffix(".json").read_text())
        pixels = load_image_batch(images, manifest["preprocess"]).numpy()
        sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": pixels})))
        refs[name] = {"pixels": pixels, "outputs": outs, "top1": top1(outs, classes),
                      "classnames": manifest.get("classnames")}
    return refs, classes


def top1(outputs: dict, classes: np.ndarray) -> np.ndarray:
    """The classifier head's top-1, or the zero-shot top-1 of the embeddings when the export has no head."""
    if "logits" in outputs:
        return np.argmax(outputs["logits"], axis=1)
    return np.argmax(np.asarray(outputs["image_embeds"]) @ classes.T, axis=1)


def check_doc(doc: dict, ref: dict, classes: np.ndarray, images: list) -> dict:
    """Every image's outputs against Python's; returns the max abs embedding difference at size and resized."""
    got = {k: np.array([e[k] for e in doc["images"]]) for k in ref["outputs"]}
    assert [e["path"] for e in doc["images"]] == [str(p) for p in images]
    diff = np.abs(got["image_embeds"] - ref["outputs"]["image_embeds"]).max(axis=1)
    figures = {"model_size": float(diff[:EVAL_IMAGES].max()), "resized": float(diff[EVAL_IMAGES:].max())}
    assert figures["model_size"] <= ATOL and figures["resized"] <= ATOL, (figures, diff)
    assert (top1(got, classes) == ref["top1"]).all()
    if "kept_patch_indices" in got:
        assert (got["kept_patch_indices"] == ref["outputs"]["kept_patch_indices"]).all()
    if "logits" in got:
        for entry, logits in zip(doc["images"], ref["outputs"]["logits"]):
            order = np.argsort(-logits, kind="stable")[:5]
            assert [t["class"] for t in entry["top5"]] == [ref["classnames"][i] for i in order]
    return figures


def check_pixels(dump, ref: dict) -> None:
    """The consumer's pixel_values (decoded, resized, cropped, normalized) are Pillow's, bit for bit."""
    pixels = np.fromfile(dump, dtype=np.float32).reshape(ref["pixels"].shape)
    assert np.array_equal(pixels, ref["pixels"]), np.abs(pixels - ref["pixels"]).max(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def cpp_binary(toolchains):
    require(toolchains, "cpp")
    return consumers.build_cpp()


@pytest.fixture(scope="module")
def web_modules(toolchains):
    require(toolchains, "node")
    consumers.install_web_modules()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpp_embed_matches_python(cpp_binary, backend, exports, images, reference, tmp_path):
    refs, classes = reference
    for name, onnx in exports.items():
        doc = consumers.run_cpp(onnx, images, backend, dump_pixels=tmp_path / "pixels.bin")
        check_pixels(tmp_path / "pixels.bin", refs[name])
        print(f"C++/{doc['backend']} {name}: {check_doc(doc, refs[name], classes, images)}")


def test_node_matches_python(web_modules, exports, images, reference, tmp_path):
    refs, classes = reference
    for name, onnx in exports.items():
        doc = consumers.run_node(onnx, images, dump_pixels=tmp_path / "pixels.bin")
        check_pixels(tmp_path / "pixels.bin", refs[name])
        print(f"Node/{doc['backend'].split(' (')[0]} {name}: {check_doc(doc, refs[name], classes, images)}")


def test_chromium_page_matches_python(toolchains, web_modules, exports, images, reference):
    require(toolchains, "chromium")
    refs, classes = reference
    for name, onnx in exports.items():
        doc = consumers.run_chromium(onnx, images)
        print(f"Chromium/{doc['backend'].split(' (')[0]} {name}: {check_doc(doc, refs[name], classes, images)}")


def test_the_page_shows_an_image_and_its_top5(toolchains, web_modules, exports, images, reference, tmp_path):
    require(toolchains, "chromium")
    refs, _ = reference
    ref = refs["tokens+classifier"]
    shown = consumers.screenshot(exports["tokens+classifier"], images[0], tmp_path / "page.png", size=(860, 520))
    assert struct.unpack(">II", (tmp_path / "page.png").read_bytes()[16:24]) == (860, 520)  # PNG header: width, height
    order = np.argsort(-ref["outputs"]["logits"][0], kind="stable")[:5]
    assert shown["top5"] == [ref["classnames"][i] for i in order]
    assert shown["kept"] == ref["outputs"]["kept_patch_indices"].shape[1]
    assert re.match(r"inference \d+\.\d ms \(first run \d+\.\d ms\)", shown["latency"]), shown["latency"]


def test_prtool_embed_refuses_bad_input(cpp_binary, exports, images, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    for args, code, words in ((["--batch", "0", str(exports["pruned"]), str(images[0])], 2, "--batch must be"),
                              (["--batch", "x", str(exports["pruned"]), str(images[0])], 2, "needs an integer"),
                              ([str(exports["pruned"]), str(bad)], 1, "neither PNG nor JPEG"),
                              ([str(exports["pruned"]), str(tmp_path / "missing.png")], 1, "cannot open image")):
        with pytest.raises(PrtoolError) as err:
            consumers.run_tool([str(cpp_binary), *args], "prtool-embed", 120)
        assert f"exit {code}" in str(err.value) and words in str(err.value)
    stale = tmp_path / "stale.onnx"
    stale.write_bytes(exports["pruned"].read_bytes() + b"\0")
    stale.with_suffix(".json").write_text(exports["pruned"].with_suffix(".json").read_text())
    with pytest.raises(PrtoolError, match="describes another graph"):
        consumers.run_cpp(stale, images[:1])



def test_compat_matrix_runs_the_consumers(tiny, cpp_binary, web_modules):
    from prtool.deploy import compat
    from prtool.encoder.build import schedule_for

    variants = [v for v in compat.VARIANTS if v.name == "pruned-flat/torchscript"]
    result = compat.run_compat(tiny, schedule_for(tiny, "1:16,2:16"), variants=variants,
                               runtimes=("cpp-onnxruntime", "node-ort-web"), command="pytest")
    cells = result["cells"]["pruned-flat/torchscript"]  # the tiny model's 64 px: the consumers resize the canvases
    assert cells["cpp-onnxruntime"]["status"] == "pass" and cells["node-ort-web"]["status"] == "pass", cells
    assert result["runtimes"]["node-ort-web"]["version"] == "1.30.0"
    assert "## Cannot run the graph" in compat.matrix_markdown(result)


def outcome_of_require(missing, name) -> tuple[str, str]:
    try:
        require(missing, name)
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # pytest's outcomes are BaseExceptions
        return type(exc).__name__, str(exc)
    return "ran", ""


def test_a_missing_toolchain_skips_here_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(consumers.shutil, "which", lambda name: None)
    missing = consumers.missing_toolchains()
    assert "apt-get install -y chromium" in missing["chromium"] and "apt-get install -y nodejs" in missing["node"]
    monkeypatch.delenv("CI", raising=False)
    kind, message = outcome_of_require(missing, "chromium")
    assert kind == "Skipped" and "apt-get install -y chromium" in message
    monkeypatch.setenv("CI", "true")
    kind, message = outcome_of_require(missing, "chromium")
    assert kind == "Failed" and "cannot run under CI" in message
    assert outcome_of_require({}, "chromium") == ("ran", "")
