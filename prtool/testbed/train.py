"""Train the testbed CLIP from scratch on Cluttered Fashion-MNIST (CPU, about an hour on 2 cores).

Objective: CLIP's symmetric contrastive loss with *soft targets over classes*. Captions come from
12 templates x 3-4 synonyms per class, so one batch of 64 images holds many captions of the same
class, and often the very same caption twice. Plain InfoNCE would treat those as negatives and
push apart captions that mean the same thing (false negatives). Instead each image draws one
caption, duplicate captions are merged, and the image->text target is uniform over the captions
of the image's class, the text->image target uniform over the images of the caption's class.
The loss is the mean of the two soft-target cross-entropies.

Training canvases are rendered afresh every epoch (new seed, same 60k items), so the model never
sees the same clutter twice. The job checkpoints every ``save_every`` steps and resumes.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prtool.testbed import data as tbdata
from prtool.testbed import spec
from prtool.util.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    samples: int = 224_000  # images seen in total (3.7 epochs of the 60k train split, about an hour)
    batch_size: int = 64  # small batches: more updates per image, which this under-trained regime needs
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 300
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True
    save_every: int = 100
    eval_images: int = 2000


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def images_to_tensor(canvases: np.ndarray, preprocess: dict) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` canvases at model resolution -> normalized float ``[B, 3, H, W]``."""
    x = torch.from_numpy(canvases).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, img_cls: torch.Tensor,
                   txt_cls: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss whose targets are uniform over same-class partners (no false negatives)."""
    logits = scale * img @ txt.t()
    same = (img_cls[:, None] == txt_cls[None, :]).float()
    t_i2t = same / same.sum(1, keepdim=True)
    t_t2i = same.t() / same.t().sum(1, keepdim=True)
    loss_i = -(t_i2t * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(t_t2i * logits.t().log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def _batches(items, labels, cfg: TrainConfig, start_step: int, total_steps: int):
    """Yield ``(step, canvases, labels)``; epoch e renders with seed ``(cfg.seed, e)``."""
    per_epoch = len(items) // cfg.batch_size
    for step in range(start_step, total_steps):
        epoch, b = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch, 1]).permutation(len(items))
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        canvases = tbdata.render_canvases(items, seed=cfg.seed * 1000 + epoch + 1, indices=idx)
        yield step, canvases, labels[idx]


def _prefetch(gen, depth: int = 3):
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        for item in gen:
            q.put(item)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        yield item


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices, none on embeddings, norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def _resume(state_path: Path, model, opt, total: int) -> int:
    """Load the saved training state, if any; returns the step to start at."""
    if not state_path.exists():
        return 0
    st = torch.load(state_path, map_location="cpu", weights_only=True)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    log.info("resuming testbed training at step %d/%d", int(st["step"]), total)
    return int(st["step"])


class _Captions:
    """Every class caption tokenized once; a batch draws one caption per image (seeded by the step)."""

    def __init__(self, tokenizer):
        captions = [c for caps in spec.class_captions() for c in caps]
        self.cls = torch.tensor([k for k, caps in enumerate(spec.class_captions()) for _ in caps])
        self.tokens = tokenizer(captions)
        self.first = torch.tensor([0] + list(np.cumsum([len(c) for c in spec.class_captions()])))

    def pick(self, y: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """The distinct captions of the batch (indices into ``tokens``)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        counts = self.first[1:] - self.first[:-1]
        return torch.unique(self.first[y] + (torch.rand(len(y), generator=gen) * counts[y]).long())


def _train_step(model, opt, captions: _Captions, canvases, y, step: int, total: int, cfg: TrainConfig,
                pre: dict) -> torch.Tensor:
    """One optimizer step on a batch; returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, cfg)
    y = torch.from_numpy(y)
    uniq = captions.pick(y, cfg.seed, step)
    images = images_to_tensor(canvases, pre)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(captions.tokens[uniq]), dim=-1)
    loss = soft_clip_loss(img.float(), txt.float(), model.logit_scale.exp(), y, captions.cls[uniq])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss


def _save_checkpoint(model, cfg: TrainConfig, out: Path) -> None:
    """The trained weights as fp16 safetensors, renamed into place."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"prtool": "testbed", "config": json.dumps(asdict(cfg))})
    tmp.replace(out)


def train_testbed(out: Path, cfg: TrainConfig = TrainConfig(), idx_dir: Path = tbdata.DEFAULT_IDX_DIR,
                  resume: bool = True, quiet: bool = False) -> dict:
    """Train the testbed and write ``out`` (fp16 safetensors) plus ``NAME.train.json`` with the metrics."""
    import open_clip

    from prtool.encoder.models import preprocess_config, register_testbed
    from prtool.util.seed import seed_everything

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_suffix(".train-state.pt")
    seed_everything(cfg.seed)
    register_testbed()
    model = open_clip.create_model(spec.MODEL_NAME, pretrained=None, load_weights=False)
    tokenizer = open_clip.get_tokenizer(spec.MODEL_NAME)
    pre = preprocess_config(model)
    items, labels = tbdata.load_fashion_mnist("train", idx_dir)
    labels = labels.astype(np.int64)
    captions = _Captions(tokenizer)
    opt = _optimizer(model, cfg)
    total = cfg.samples // cfg.batch_size
    start = _resume(state_path, model, opt, total) if resume else 0

    model.train()
    t0, seen = time.time(), 0
    with progress_bar(total, "train testbed", quiet=quiet, completed=start) as bar:
        for step, canvases, y in _prefetch(_batches(items, labels, cfg, start, total)):
            loss = _train_step(model, opt, captions, canvases, y, step, total, cfg, pre)
            seen += len(y)
            info = f"loss {loss.item():.3f} {seen / (time.time() - t0):.0f} img/s"
            bar.update(1, info=info)
            if step % 50 == 0:
                log.info("step %d/%d %s", step, total, info)
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                tmp = state_path.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
                tmp.replace(state_path)
    model.eval()
    _save_checkpoint(model, cfg, out)
    meta = {"config": asdict(cfg), "steps": total, "train_seconds_this_run": round(time.time() - t0, 1)}
    # beside the checkpoint as NAME.train.json (NAME.json is the model config in the assets folder)
    out.with_name(out.stem + ".train.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
