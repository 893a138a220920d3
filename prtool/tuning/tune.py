"""``prtool tune``: learn text context and visual tokens with CLIP and the predictor frozen and
pruning active in the loop (cross-entropy over ``logit_scale * cos(image, class text)``).

Sixteen images per class are few: plain CoOp drifts from the hand-made prompts and can end below
the zero-shot classifier it started from. The loss therefore adds KgCoOp's knowledge-guided term
(Yao et al., CVPR 2023), ``kg_weight * mean_c ||w_c - w_c^zs||^2`` between the learned class
embeddings and the zero-shot ones (templates x synonyms), and each class embedding averages the
class's synonyms behind the learned context, as the zero-shot classifier does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prtool.data.datasets import ImageDataset
from prtool.data.zeroshot import evaluate_embeddings
from prtool.encoder.build import EncoderSpec, build_pruned_encoder
from prtool.encoder.models import LoadedModel
from prtool.tuning.prompts import PromptLearner, learner_classnames, learner_synonyms, save_tokens
from prtool.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneConfig:
    n_ctx: int = 16
    mode: str = "both"
    shots: int = 16
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    init: str = "a photo of a"
    seed: int = 0
    kg_weight: float = 8.0  # KgCoOp's lambda; 0 = plain CoOp


def make_learner(loaded: LoadedModel, cfg: TuneConfig) -> PromptLearner:
    return PromptLearner(loaded.model, loaded.tokenizer(), cfg.n_ctx, cfg.mode, cfg.init,
                         vision_width=loaded.visual.class_embedding.shape[0], seed=cfg.seed)


def tuned_encoder(loaded: LoadedModel, spec: EncoderSpec, learner: PromptLearner):
    """The pruned encoder with room for the learner's visual tokens (set per forward while tuning)."""
    vt = learner.visual_tokens()
    enc, _ = build_pruned_encoder(loaded, spec, normalize=True,
                                  visual_prompts=None if vt is None else torch.zeros_like(vt.detach()))
    return enc


def _set_visual_tokens(enc, learner: PromptLearner) -> None:
    vt = learner.visual_tokens()
    if vt is not None:
        enc.visual_prompts = vt  # a buffer slot: gradients flow to the learner while tuning


def tune_tokens(loaded: LoadedModel, train: ImageDataset, spec: EncoderSpec, cfg: TuneConfig,
                quiet: bool = False) -> tuple[PromptLearner, dict]:
    torch.manual_seed(cfg.seed)
    learner = make_learner(loaded, cfg)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    enc = tuned_encoder(loaded, spec, learner)
    for p in enc.parameters():
        p.requires_grad_(False)
    params = [p for p in learner.parameters() if p.requires_grad and p.numel() > 0]
    history = []
    if not params:  # n_ctx = 0: nothing to learn, the untuned model
        return learner, {"history": history}
    pixels, labels, _ = train.load(range(len(train)), loaded.preprocess)
    labels = torch.from_numpy(labels)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    scale = loaded.model.logit_scale.exp().detach()
    zero_shot = None
    if learner.uses_text and cfg.kg_weight > 0:
        from prtool.data.zeroshot import class_text_embeddings

        with torch.no_grad():
            zero_shot = class_text_embeddings(loaded.model, learner.tokenizer, train.class_prompts).float()
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    with progress_bar(cfg.epochs, "tune", quiet=quiet) as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train), generator=gen)
            losses, correct = [], 0
            for s in range(steps_per_epoch):
                idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                _set_visual_tokens(enc, learner)
                img = enc(pixels[idx])
                txt = learner.class_embeddings(train.classnames, synonyms=train.class_synonyms)
                logits = scale * img @ txt.t()
                loss = F.cross_entropy(logits, labels[idx])
                if zero_shot is not None:
                    loss = loss + cfg.kg_weight * (txt - zero_shot).pow(2).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(loss.item())
                correct += int((logits.argmax(1) == labels[idx]).sum())
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                            "train_acc": 100.0 * correct / len(train)})
            bar.update(1, info=f"loss {history[-1]['loss']:.3f} acc {history[-1]['train_acc']:.1f}")
    return learner.eval(), {"history": history}


@torch.no_grad()
def evaluate_tuned(loaded: LoadedModel, learner: PromptLearner, dataset: ImageDataset, spec: EncoderSpec,
                   batch_size: int = 64, hits_out: list | None = None) -> dict:
    enc = tuned_encoder(loaded, spec, learner)
    _set_visual_tokens(enc, learner)
    class_emb = learner.class_embeddings(dataset.classnames, dataset.class_prompts, dataset.class_synonyms)

    def embed(pixels, rows):
        return enc(pixels).numpy()

    return evaluate_embeddings(embed, dataset.batches(batch_size, loaded.preprocess), class_emb, hits_out=hits_out)


def save_tuned(learner: PromptLearner, out: Path, loaded: LoadedModel, spec: EncoderSpec, cfg: TuneConfig,
               classnames: list[str], metrics: dict, synonyms: list[list[str]] | None = None) -> None:
    from prtool.util.files import sha256_file

    pred = spec.predictor_path
    save_tokens(learner, out, {"model_id": loaded.model_id, "schedule": spec.schedule.to_string(),
                               "scorer": spec.scorer, "predictor": str(pred) if pred else None,
                               "predictor_sha256": sha256_file(pred) if pred else None,
                               "classnames": classnames, "class_synonyms": synonyms or [[c] for c in classnames],
                               "train_config": asdict(cfg), **metrics})


def export_extras(loaded: LoadedModel, spec: EncoderSpec, tokens: Path | None, classifier: bool,
                  dataset: ImageDataset | None = None, data: str | None = None) -> dict:
    """What ``prtool export --tokens/--classifier`` bakes in: visual tokens, class embeddings, manifest notes
    (``data``: the ``--data`` the zero-shot head's class names came from, recorded to rebuild it)."""
    from prtool.errors import PrtoolError
    from prtool.tuning.prompts import load_tokens
    from prtool.util.files import sha256_file

    out: dict = {"visual_prompts": None, "class_embeds": None, "manifest": {}}
    learner = None
    if tokens is not None:
        learner, meta = load_tokens(tokens, loaded.model, loaded.tokenizer(), loaded.visual.class_embedding.shape[0],
                                    loaded.model_id, spec.schedule.to_string(), spec.scorer, spec.predictor_path,
                                    spec.allow_other_weights)
        vt = learner.visual_tokens()
        out["visual_prompts"] = None if vt is None else vt.detach()
        out["manifest"]["tokens"] = {"file": str(tokens), "sha256": sha256_file(tokens), "n_ctx": meta["n_ctx"],
                                     "mode": meta["mode"], "visual_tokens": 0 if vt is None else int(vt.shape[0])}
    if classifier:
        if learner is not None and learner.uses_text:
            classnames = learner_classnames(tokens)
            with torch.no_grad():
                out["class_embeds"] = learner.class_embeddings(classnames, synonyms=learner_synonyms(tokens))
        elif dataset is not None:
            from prtool.data.zeroshot import text_classifier

            classnames = dataset.classnames
            out["class_embeds"] = text_classifier(loaded, dataset)
            out["manifest"]["classifier_data"] = data
        else:
            raise PrtoolError("--classifier needs class names: pass --tokens from `prtool tune` or --data")
        out["manifest"]["classnames"] = list(classnames)
    return out
