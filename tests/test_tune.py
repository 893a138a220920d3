"""Phase III: learnable tokens, tuned with pruning on, exported with the model."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prtool.bench.evaluate import evaluate_zero_shot
from prtool.data.datasets import few_shot, load_dataset
from prtool.encoder.build import EncoderSpec, schedule_for
from prtool.errors import PrtoolError
from prtool.export.onnx_export import ExportOptions, export_onnx
from prtool.runtime.session import ort_session
from prtool.tuning.prompts import load_tokens
from prtool.tuning.tune import (
    TuneConfig,
    evaluate_tuned,
    export_extras,
    make_learner,
    save_tuned,
    tune_tokens,
    tuned_encoder,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    for c, name in enumerate(["red", "blue"]):
        (root / name).mkdir()
        for i in range(4):
            rgb = np.zeros((64, 64, 3), np.uint8)
            rgb[..., 0 if c == 0 else 2] = 150 + 20 * i
            Image.fromarray(rgb).save(root / name / f"{i}.png")
    return load_dataset(str(root), "test")


def _tune(tiny, data, mode="both", n_ctx=2, sched="1:32"):
    spec = EncoderSpec(schedule_for(tiny, sched), "cls-attn")
    learner, metrics = tune_tokens(tiny, few_shot(data, 2), spec,
                                   TuneConfig(n_ctx=n_ctx, mode=mode, epochs=2, batch_size=2),
                                   quiet=True)
    return spec, learner, metrics


def test_tokens_are_protected_and_invisible_to_the_predictor(tiny, data):
    spec, learner, _ = _tune(tiny, data)
    enc = tuned_encoder(tiny, EncoderSpec(spec.schedule, "predictor"), learner)
    seen = {}
    enc.scorer.predictor.register_forward_hook(lambda m, i, o: seen.update(n=i[0].shape[1]))
    vt = learner.visual_tokens().detach()
    enc.visual_prompts = vt
    pixels, _, _ = data.load(range(2), tiny.preprocess)
    with torch.no_grad():
        x = enc.tokens_before(pixels, 1)
        enc(pixels)
    assert seen["n"] == 64  # only the 64 patches reach the predictor
    assert enc.num_prefix == 3 and torch.allclose(x[:, 1:3], enc.transformer.resblocks[0](enc.embed(pixels))[:, 1:3])
    # after pruning the prefix (CLS + 2 tokens) is intact: stage 1 keeps 32 patches + 3 protected tokens
    sel, kept = enc.select(x, 1)
    assert sel.shape[1] == 3 + 32 and torch.equal(sel[:, :3], x[:, :3])


def test_n_ctx_zero_is_the_untuned_model(tiny, data):
    spec, learner, metrics = _tune(tiny, data, n_ctx=0)
    assert metrics["history"] == [] and learner.visual_tokens() is None
    tuned = evaluate_tuned(tiny, learner, data, spec)
    plain = evaluate_zero_shot(tiny, data, spec)
    assert tuned["top1"] == plain["top1"] and tuned.get("top5") == plain.get("top5")


def _train_loss(tiny, data, spec, learner) -> float:
    """Cross-entropy of the tuned (or untuned) prompts on the few-shot training images."""
    train = few_shot(data, 2)
    enc = tuned_encoder(tiny, spec, learner)
    if learner.visual_tokens() is not None:
        enc.visual_prompts = learner.visual_tokens().detach()
    pixels, labels, _ = train.load(range(len(train)), tiny.preprocess)
    with torch.no_grad():
        txt = learner.class_embeddings(train.classnames, synonyms=train.class_synonyms)
        logits = tiny.model.logit_scale.exp() * enc(pixels) @ txt.t()
        return F.cross_entropy(logits, torch.from_numpy(labels)).item()


@pytest.mark.parametrize("mode", ["text", "visual", "both"])
def test_modes_train(tiny, data, mode):
    spec, learner, metrics = _tune(tiny, data, mode=mode)
    start = make_learner(tiny, TuneConfig(n_ctx=2, mode=mode))  # the same seeded initialisation
    assert (learner.visual_tokens() is None) == (mode == "text")
    # what the mode trains has moved, the epoch loss fell, and the prompts fit the training images better
    assert not torch.equal(learner.ctx, start.ctx)
    if mode != "text":
        assert not torch.equal(learner.visual_proj.weight, start.visual_proj.weight)
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert _train_loss(tiny, data, spec, learner) < _train_loss(tiny, data, spec, start)


def test_tuned_export_with_classifier_matches_pytorch(tiny, data, tmp_path):
    spec, learner, metrics = _tune(tiny, data)
    tokens = tmp_path / "tok.safetensors"
    save_tuned(learner, tokens, tiny, spec, TuneConfig(n_ctx=2), data.classnames, metrics)
    extras = export_extras(tiny, spec, tokens, classifier=True)
    res = export_onnx(tiny, spec, tmp_path / "m.onnx", ExportOptions(), visual_prompts=extras["visual_prompts"],
                      extra_manifest=extras["manifest"], class_embeds=extras["class_embeds"])
    assert res.report.passed, res.report.failure_summary()
    assert res.report.metrics["logits @ batch 7"]["max_abs"] <= 1e-4
    man = json.loads(res.manifest_path.read_text())
    assert man["classnames"] == ["blue",
                                 "red"] and man["tokens"]["visual_tokens"] == 2 and man["num_prefix_tokens"] == 3
    assert [o["name"] for o in man["outputs"]] == ["image_embeds", "logits"]
    # the export's top-1 equals PyTorch's
    sess = ort_session(res.onnx_path)
    pixels, labels, _ = data.load(range(len(data)), tiny.preprocess)
    logits = sess.run(None, {"pixel_values": pixels.numpy()})[1]
    onnx_top1 = 100.0 * (logits.argmax(1) == labels).mean()
    assert onnx_top1 == pytest.approx(evaluate_tuned(tiny, learner, data, spec)["top1"])
    # `prtool eval --onnx` scores an export with a classifier head by its own logits
    via_eval = evaluate_zero_shot(tiny, data, onnx_path=res.onnx_path)
    assert via_eval["head"] == "onnx logits" and via_eval["top1"] == pytest.approx(onnx_top1)
    assert via_eval["schedule"] == spec.schedule.to_string()
    renamed = type(data)(data.name, data.split, ["green", "red"], data.class_prompts, data.samples, data.arrays)
    with pytest.raises(PrtoolError, match="classifier head has classes"):
        evaluate_zero_shot(tiny, renamed, onnx_path=res.onnx_path)


def test_tokens_for_another_model_or_schedule_are_refused(tiny, data, tmp_path):
    spec, learner, metrics = _tune(tiny, data)
    tokens = tmp_path / "tok.safetensors"
    save_tuned(learner, tokens, tiny, spec, TuneConfig(n_ctx=2), data.classnames, metrics)
    with pytest.raises(PrtoolError, match="schedule '1:32', not '1:16'"):
        export_extras(tiny, EncoderSpec(schedule_for(tiny, "1:16"), "cls-attn"), tokens, classifier=False)
    meta = json.loads(tokens.with_suffix(".json").read_text())
    meta["model_id"]["model"] = "ViT-B-16"
    tokens.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(PrtoolError, match="tuned for model 'ViT-B-16', not 'prtool-tiny'"):
        load_tokens(tokens, tiny.model, None, 32, tiny.model_id, "1:32")



def test_tokens_tuned_behind_another_ranking_are_refused(tiny, data, tmp_path):
    spec, learner, metrics = _tune(tiny, data)
    tokens = tmp_path / "tok.safetensors"
    save_tuned(learner, tokens, tiny, spec, TuneConfig(n_ctx=2), data.classnames, metrics)
    pred = tmp_path / "pred.safetensors"
    pred.write_bytes(b"some predictor")
    with pytest.raises(PrtoolError, match="tuned with scorer 'cls-attn', not 'predictor'.*--scorer cls-attn"):
        export_extras(tiny, EncoderSpec(schedule_for(tiny, "1:32"), "predictor", pred), tokens, classifier=False)
    meta = json.loads(tokens.with_suffix(".json").read_text())
    assert meta["predictor_sha256"] is None
    meta.update(scorer="predictor", predictor="other.safetensors", predictor_sha256="ab" * 32)
    tokens.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(PrtoolError, match="tuned behind predictor other.safetensors"):
        export_extras(tiny, EncoderSpec(schedule_for(tiny, "1:32"), "predictor", pred), tokens, classifier=False)
    from prtool.util.files import sha256_file

    meta["predictor_sha256"] = sha256_file(pred)  # the same predictor file: accepted
    tokens.with_suffix(".json").write_text(json.dumps(meta))
    assert export_extras(tiny, EncoderSpec(schedule_for(tiny, "1:32"), "predictor", pred), tokens,
                         classifier=False)["manifest"]["tokens"]


def test_export_text_with_learned_context(tiny, data, tmp_path):
    from prtool.export.text_export import export_text

    spec, learner, metrics = _tune(tiny, data, mode="text")
    tokens = tmp_path / "tok.safetensors"
    save_tuned(learner, tokens, tiny, spec, TuneConfig(n_ctx=2, mode="text"), data.classnames, metrics)
    res = export_text(tiny, tmp_path / "text.onnx", tokens)
    assert res["n_ctx"] == 2 and res["max_abs"] <= 1e-4
    ids = learner.prompt_tokens(["red", "blue"])
    got = ort_session(tmp_path / "text.onnx").run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = learner.class_embeddings(["red", "blue"]).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_bench_prompts_rows(tiny, data):
    from prtool.bench.prompts import bench_prompts, markdown_table

    res = bench_prompts(tiny, data, data, schedule_for(tiny, "1:32"), "cls-attn", None,
                        TuneConfig(n_ctx=2, shots=2, epochs=1, batch_size=2))
    assert [r["row"] for r in res["rows"]] == ["none", "prune", "T", "T+prune", "T+V", "T+V+prune"]
    g = {r["row"]: r["gflops"] for r in res["rows"]}
    assert g["prune"] < g["none"] < g["T+V"] and g["T+prune"] == g["prune"]
    assert "| T+V+prune | 1:32 |" in markdown_table(res)
    # paired differences are the row top-1s' differences (same images), with a standard error
    top1 = {r["row"]: r["top1"] for r in res["rows"]}
    for p in res["paired"]:
        assert p["diff"] == pytest.approx(top1[p["a"]] - top1[p["b"]]) and p["se"] >= 0
    assert "T+V+prune − prune" in markdown_table(res)


def test_class_embedding_averages_synonyms_behind_the_context(tiny, data):
    import torch.nn.functional as F

    _, learner, _ = _tune(tiny, data, mode="text")
    with torch.no_grad():
        single = learner.class_embeddings(["red", "blue", "crimson"])
        both = learner.class_embeddings(["red", "blue"], synonyms=[["red", "crimson"], ["blue"]])
        plain = learner.class_embeddings(["red", "blue"], synonyms=[["red"], ["blue"]])
    assert torch.allclose(plain, single[:2], atol=1e-6)
    assert torch.allclose(both[0], F.normalize(single[0] + single[2], dim=0), atol=1e-6)
    assert torch.allclose(both[1], single[1], atol=1e-6)
    with pytest.raises(PrtoolError, match="synonym lists"):
        learner.class_embeddings(["red", "blue"], synonyms=[["red"]])


def test_kg_term_keeps_the_text_near_zero_shot(tiny, data):
    """KgCoOp's term: a large weight keeps the learned class embeddings closer to the zero-shot ones."""
    from prtool.data.zeroshot import class_text_embeddings

    spec = EncoderSpec(schedule_for(tiny, "1:32"), "cls-attn")
    shots = few_shot(data, 2)
    dist = {}
    for kg in (0.0, 100.0):
        cfg = TuneConfig(n_ctx=2, mode="text", epochs=3, batch_size=2, lr=0.05, kg_weight=kg)
        learner, _ = tune_tokens(tiny, shots, spec, cfg, quiet=True)
        with torch.no_grad():
            txt = learner.class_embeddings(shots.classnames, synonyms=shots.class_synonyms)
            zs = class_text_embeddings(tiny.model, learner.tokenizer, shots.class_prompts)
        dist[kg] = float((txt - zs).pow(2).sum(1).mean())
    assert dist[100.0] < dist[0.0]


def test_n_ctx_must_leave_room_for_the_class_names(tiny, data):
    from prtool.tuning.prompts import context_room, resolve_n_ctx
    tok = tiny.tokenizer()
    room = context_room(tiny.model, tok, [["red"], ["blue"]])
    assert room == tiny.model.positional_embedding.shape[0] - 2 - 2  # start, end; "blue." is 2 tokens
    assert resolve_n_ctx(None, tiny.model, tok, [["red"], ["blue"]]) == min(16, room)
    assert resolve_n_ctx(room, tiny.model, tok, [["red"], ["blue"]]) == room
    with pytest.raises(PrtoolError, match=f"--n-ctx {room + 1} does not fit.*use --n-ctx {room} or fewer"):
        resolve_n_ctx(room + 1, tiny.model, tok, [["red"], ["blue"]])
    with pytest.raises(PrtoolError, match="does not fit"):  # a prompt cut short never reaches the text tower
        _tune(tiny, data, mode="text", n_ctx=room + 1)
