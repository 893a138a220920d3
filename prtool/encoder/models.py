"""Loading CLIP models: open_clip architectures, pretrained tags, local checkpoints, the testbed.

``load_clip("ViT-B-16", "openai")`` downloads through open_clip (on the user's machine);
``load_clip("ViT-B-16", "/path/weights.safetensors")`` loads a local file without unpickling
code; ``load_clip("testbed")`` loads prtool's own trained model; ``pretrained="none"`` gives
random weights (tests, speed work).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prtool.errors import PrtoolError
from prtool.util.files import sha256_file

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0


@dataclass
class LoadedModel:
    """A CLIP model plus everything an artifact must record about where it came from."""

    model: nn.Module
    name: str
    pretrained: str
    checkpoint_sha256: str | None
    preprocess: dict = field(default_factory=dict)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def model_id(self) -> dict:
        return {"model": self.name, "pretrained": self.pretrained, "checkpoint_sha256": self.checkpoint_sha256}

    def tokenizer(self):
        """The model's open_clip tokenizer."""
        return _open_clip().get_tokenizer(self.name)


def _open_clip():
    import open_clip

    return open_clip


def register_testbed() -> None:
    """Register the testbed architecture with open_clip (idempotent)."""
    from prtool.testbed import spec

    oc = _open_clip()
    if spec.MODEL_NAME not in oc.list_models():
        oc.add_model_config(spec.CONFIG_PATH)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely: safetensors, or a torch file with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise PrtoolError(f"checkpoint {path} does not exist: pass an existing file or an open_clip pretrained tag")
    if path.is_dir():
        raise PrtoolError(f"checkpoint {path} is a directory: pass the weights file inside it")
    if path.stat().st_size == 0:
        raise PrtoolError(f"checkpoint {path} is empty: re-download or re-save it")
    if path.suffix == ".onnx":
        raise PrtoolError(f"checkpoint {path} is an ONNX graph, not weights: pass the .safetensors or torch state_dict "
                          "of the CLIP model (--pretrained takes weights, an open_clip tag or 'none')")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and int.from_bytes(head, "little") < (1 << 28)
                                         and not zipfile.is_zipfile(path)):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PrtoolError(
                f"checkpoint {path} is not a readable safetensors file ({exc}): it may be truncated; re-save it"
            ) from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower():
                raise PrtoolError(
                    f"checkpoint {path} holds pickled code (objects other than tensors), which prtool never unpickles: "
                    "re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as safetensors"
                ) from None
            raise PrtoolError(
                f"checkpoint {path} is not a checkpoint ({str(exc).splitlines()[0]}): pass a safetensors file or a "
                "torch state_dict"
            ) from None
        except Exception as exc:  # corrupt torch files raise RuntimeError, EOFError, KeyError, ...
            raise PrtoolError(
                f"checkpoint {path} is not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:80]}): "
                "it may be truncated or of another format; pass a safetensors file or a torch state_dict"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PrtoolError(f"checkpoint {path} holds no state_dict of tensors: pass a CLIP state_dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_vit(model: nn.Module, name: str) -> None:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else "no image tower"
        raise PrtoolError(
            f"model {name!r} has a {kind} image tower: prtool prunes open_clip ViT towers only "
            "(ViT-B-16, ViT-B-32, ViT-L-14, ...)"
        )


def load_clip(name: str, pretrained: str | None = None, device: str = "cpu") -> LoadedModel:
    """Build an open_clip CLIP in eval mode and load its weights.

    ``pretrained`` is an open_clip tag, a local checkpoint path, or ``"none"`` for random
    weights. ``None`` means the committed checkpoint for ``testbed`` and random weights otherwise.
    """
    oc = _open_clip()
    register_testbed()
    from prtool.testbed import spec

    if name == spec.MODEL_NAME and pretrained in (None, "", "default"):
        pretrained = str(spec.CHECKPOINT_PATH)
        if not spec.CHECKPOINT_PATH.exists():
            raise PrtoolError(
                "the testbed checkpoint is not built yet: run `prtool testbed train` (or pass --pretrained none)"
            )
    pretrained = pretrained or "none"
    if name not in oc.list_models():
        raise PrtoolError(
            f"unknown model {name!r}: use an open_clip architecture name such as ViT-B-16, ViT-B-32, "
            "ViT-L-14 or 'testbed' (`python -c \"import open_clip; print(open_clip.list_models())\"` lists them)"
        )
    is_file = pretrained != "none" and (Path(pretrained).suffix != "" or Path(pretrained).exists() or "/" in pretrained)
    checkpoint_sha = None
    if pretrained == "none" or is_file:
        # Random weights are seeded, so "none" is the same model in every process (torchrun ranks,
        # a resumed job, a validation run) without touching the caller's random state.
        with torch.random.fork_rng(devices=[]), _no_random_init_warning(is_file):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = oc.create_model(name, pretrained=None, device=device, load_weights=False)
        _check_vit(model, name)
        if is_file:
            path = Path(pretrained)
            state = read_state_dict(path)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0]
                raise PrtoolError(
                    f"checkpoint {path} does not fit model {name!r} ({first}): pass the architecture it was trained as"
                ) from None
            checkpoint_sha = sha256_file(path)
    else:
        tags = oc.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise PrtoolError(
                f"unknown pretrained tag {pretrained!r} for {name}: known tags are {', '.join(tags) or 'none'}; "
                "or pass a local checkpoint file, or 'none'"
            )
        try:
            model = oc.create_model(name, pretrained=pretrained, device=device)
        except Exception as exc:  # network errors come in many types
            raise PrtoolError(
                f"could not download {name}/{pretrained} ({type(exc).__name__}): this machine may have no access to "
                "the model hub; download the weights elsewhere and pass the local file with --pretrained PATH"
            ) from None
        _check_vit(model, name)
    model.eval()
    return LoadedModel(model, name, pretrained if not is_file else Path(pretrained).name, checkpoint_sha,
                       preprocess_config(model))


@contextlib.contextmanager
def _no_random_init_warning(active: bool):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" while prtool builds a
    model it then loads its own weights into."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def preprocess_config(model: nn.Module) -> dict:
    """What a consumer must do to an image before the encoder (recorded in every manifest)."""
    visual = model.visual
    size = visual.image_size
    size = list(size) if isinstance(size, (tuple, list)) else [size, size]
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "image_size": size,
        "mode": cfg.get("mode", "RGB"),
        "channel_order": "RGB",
        "layout": "NCHW",
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "resize": "shortest side to image_size, then center crop to image_size",
        "scale": "pixel / 255",
        "mean": list(cfg.get("mean", OPENAI_DATASET_MEAN)),
        "std": list(cfg.get("std", OPENAI_DATASET_STD)),
    }


def describe_weights(model_id: dict) -> str:
    """``model / pretrained (sha256 abc123...)`` for messages."""
    sha = model_id.get("checkpoint_sha256")
    return f"{model_id.get('model')} / {model_id.get('pretrained')}" + (f" (sha256 {sha[:12]})" if sha else "")


def same_weights(made_for: dict, model_id: dict) -> bool:
    """Whether an artifact made for ``made_for`` (a ``LoadedModel.model_id``) fits ``model_id``: the same
    architecture, and the same checkpoint content (sha256) where either side has a checkpoint file,
    else the same open_clip tag (``none`` = seeded random weights)."""
    if made_for.get("model") != model_id.get("model"):
        return False
    if made_for.get("checkpoint_sha256") or model_id.get("checkpoint_sha256"):
        return made_for.get("checkpoint_sha256") == model_id.get("checkpoint_sha256")
    return made_for.get("pretrained") == model_id.get("pretrained")


def check_same_weights(what: str, path, made_for: dict, model_id: dict, allow: bool = False) -> bool:
    """Refuse ``what`` (``predictor``/``tokens``) at ``path`` made for other weights, naming both;
    ``allow`` (``--allow-other-weights``) turns the refusal into a warning. Returns whether they match."""
    if same_weights(made_for or {}, model_id):
        return True
    msg = (f"{what} {path} was made for {describe_weights(made_for or {})}, but the model is "
           f"{describe_weights(model_id)}")
    if not allow:
        raise PrtoolError(f"{msg}: use {what} made for these weights, or pass --allow-other-weights to use them "
                          "anyway (the manifest records it)")
    log.warning("%s; used anyway (--allow-other-weights)", msg)
    return False
