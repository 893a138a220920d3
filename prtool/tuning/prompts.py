"""Phase III: learnable text context (CoOp) and coupled visual tokens (MaPLe-style ``P_v = P_t W``).

Text: ``n_ctx`` shared vectors replace the placeholder words of ``"X X ... X {classname}."`` in
the token embedding, before the text transformer. Visual: ``n_ctx`` tokens derived from the text
context through one learnable linear map, inserted right after CLS (after the positional
embedding, before ``ln_pre``), protected from pruning and never shown to the predictor.
``n_ctx = 0`` is the untuned model: the template-averaged zero-shot classifier and no visual tokens.

A tokens checkpoint is ``NAME.safetensors`` (ctx, and W for visual modes) + ``NAME.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prtool.errors import PrtoolError

log = logging.getLogger(__name__)

MODES = ("text", "visual", "both")
PLACEHOLDER = "X"


def encode_text_embeddings(model, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` starting from token embeddings ``[C, L, W]`` -> ``[C, E]``."""
    from open_clip.transformer import text_global_pool

    x = embeds + model.positional_embedding.to(embeds.dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


DEFAULT_N_CTX = 16  # CoOp's unified context length


def context_room(model, tokenizer, names: list[list[str]]) -> int | None:
    """How many context vectors fit before the longest class name (``names``: the names of each
    class, e.g. ``dataset.class_synonyms``) in the model's text context.

    None when the tokenizer cannot tell (no ``encode``): then nothing is checked.
    """
    encode = getattr(tokenizer, "encode", None)
    flat = [n for group in names for n in group]
    if encode is None or not flat:
        return None
    length = int(model.positional_embedding.shape[0])
    longest = max(len(encode(f"{n.replace('_', ' ')}.")) for n in flat)
    return length - 2 - longest  # start and end of text


def resolve_n_ctx(n_ctx: int | None, model, tokenizer, names: list[list[str]]) -> int:
    """``--n-ctx``: as given (refused with the fix when it cannot fit), or by default 16 or what fits."""
    room = context_room(model, tokenizer, names)
    if n_ctx is None:
        n_ctx = DEFAULT_N_CTX if room is None else max(0, min(DEFAULT_N_CTX, room))
        if n_ctx < DEFAULT_N_CTX:
            log.info("--n-ctx %d: the most that fits this model's text context with these class names", n_ctx)
        return n_ctx
    if room is not None and n_ctx > room:
        raise PrtoolError(f"--n-ctx {n_ctx} does not fit: this model's text context holds "
                          f"{int(model.positional_embedding.shape[0])} tokens and the longest class name leaves room "
                          f"for {max(room, 0)} context vectors; use --n-ctx {max(room, 0)} or fewer")
    return n_ctx


class PromptLearner(nn.Module):
    """Learnable context for a fixed model; ``class_embeddings(classnames)`` -> ``[C, E]`` unit vectors."""

    def __init__(self, model, tokenizer, n_ctx: int = 16, mode: str = "both", init: str | None = "a photo of a",
                 vision_width: int | None = None, seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise PrtoolError(f"unknown --mode {mode!r}: use text, visual or both")
        if not hasattr(model, "token_embedding"):
            raise PrtoolError("learnable text context needs an open_clip CLIP with its own text transformer")
        # The frozen CLIP is used, not owned: keep it out of this module's parameters and state_dict.
        object.__setattr__(self, "model", model)
        self.tokenizer, self.n_ctx, self.mode = tokenizer, n_ctx, mode
        width = model.token_embedding.weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        ctx = torch.randn(n_ctx, width, generator=gen) * 0.02
        if init and n_ctx > 0:
            ids = tokenizer([init])[0]
            words = ids[1 : 1 + int((ids > 0).sum()) - 2]  # between SOT and EOT
            if len(words) == n_ctx:
                with torch.no_grad():
                    ctx = model.token_embedding(words).detach().clone()
        self.ctx = nn.Parameter(ctx)
        self.visual_proj = None
        if mode in ("visual", "both") and n_ctx > 0:
            if vision_width is None:
                raise PrtoolError("visual tokens need the image tower's width")
            self.visual_proj = nn.Linear(width, vision_width)
            with torch.no_grad():
                nn.init.normal_(self.visual_proj.weight, std=0.02, generator=gen)
                self.visual_proj.bias.zero_()

    @property
    def uses_text(self) -> bool:
        return self.mode in ("text", "both") and self.n_ctx > 0

    def visual_tokens(self) -> torch.Tensor | None:
        """``[n_ctx, vision_width]`` (``P_v = P_t W``), or None without visual tokens."""
        return None if self.visual_proj is None else self.visual_proj(self.ctx)

    def prompt_tokens(self, classnames: list[str]) -> torch.Tensor:
        prefix = " ".join([PLACEHOLDER] * self.n_ctx)
        return self.tokenizer([f"{prefix} {c.replace('_', ' ')}.".strip() for c in classnames])

    def class_embeddings(self, classnames: list[str], templates: list[list[str]] | None = None,
                         synonyms: list[list[str]] | None = None) -> torch.Tensor:
        """Class text embeddings ``[C, E]`` with the learned context; without text context, the zero-shot ones.

        With ``synonyms`` (names per class) a class embedding is the normalized mean of its names'
        embeddings, each behind the same learned context, as the zero-shot classifier averages them.
        """
        if not self.uses_text:
            from prtool.data.zeroshot import class_text_embeddings

            prompts = templates or [[f"a photo of a {c}."] for c in classnames]
            return class_text_embeddings(self.model, self.tokenizer, prompts)
        names = synonyms or [[c] for c in classnames]
        if len(names) != len(classnames):
            raise PrtoolError(f"{len(names)} synonym lists for {len(classnames)} classes")
        resolve_n_ctx(self.n_ctx, self.model, self.tokenizer, names)  # a prompt cut short is refused
        flat = [n for group in names for n in group]
        tokens = self.prompt_tokens(flat)
        emb = self.model.token_embedding(tokens)
        ctx = self.ctx.to(emb.dtype).unsqueeze(0).expand(len(flat), -1, -1)
        emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)
        per_name = F.normalize(encode_text_embeddings(self.model, emb, tokens).float(), dim=-1)
        owner = torch.tensor([c for c, group in enumerate(names) for _ in group])
        summed = torch.zeros(len(names), per_name.shape[1], dtype=per_name.dtype).index_add(0, owner, per_name)
        return F.normalize(summed, dim=-1)


def save_tokens(learner: PromptLearner, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    from prtool.util.files import follow_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"ctx": learner.ctx.detach().contiguous()}
    if learner.visual_proj is not None:
        state["visual_proj.weight"] = learner.visual_proj.weight.detach().contiguous()
        state["visual_proj.bias"] = learner.visual_proj.bias.detach().contiguous()
    tmp_w, tmp_j = path.with_name(path.name + ".tmp"), path.with_suffix(".json.tmp")
    save_file(state, str(tmp_w), metadata={"prtool": "tokens"})
    tmp_j.write_text(json.dumps({"n_ctx": learner.n_ctx, "mode": learner.mode, **meta}, indent=2, default=str) + "\n")
    follow_umask(tmp_w)
    tmp_w.replace(path)
    tmp_j.replace(path.with_suffix(".json"))


def read_tokens(path: Path, model_id: dict | None, allow_other_weights: bool = False) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a tokens checkpoint made by `prtool tune` for these weights (``model_id``;
    None checks the files only); refuses another kind of file, or tokens tuned on other weights unless
    ``allow_other_weights``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from prtool.encoder.models import check_same_weights

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if path.is_dir():
        raise PrtoolError(f"tokens {path} is a directory: pass the .safetensors written by `prtool tune`")
    if not path.exists() or not meta_path.exists():
        raise PrtoolError(f"tokens {path} (and its .json) must exist: make them with `prtool tune`")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or "n_ctx" not in meta or "mode" not in meta:
        raise PrtoolError(f"tokens {path} are not prtool tokens: {meta_path.name} is not a tokens config; "
                          "pass the .safetensors written by `prtool tune`")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrtoolError(f"tokens {path} are not a readable safetensors file ({exc}): pass the .safetensors "
                          "written by `prtool tune`") from None
    if model_id is None:
        return state, meta
    if meta.get("model_id", {}).get("model") not in (None, model_id.get("model")):
        raise PrtoolError(f"tokens {path} were tuned for model {meta['model_id']['model']!r}, not "
                          f"{model_id.get('model')!r}: tune them for this model")
    check_same_weights("tokens", path, meta.get("model_id") or {}, model_id, allow_other_weights)
    return state, meta


def load_tokens(path: Path, model, tokenizer, vision_width: int, model_id: dict, schedule_text: str,
                scorer: str | None = None, predictor_path: Path | None = None,
                allow_other_weights: bool = False) -> tuple[PromptLearner, dict]:
    """Read a tokens checkpoint and refuse one made for another model, weights, schedule, scorer or
    predictor file (when those are given), naming both."""
    path = Path(path)
    state, meta = read_tokens(path, model_id, allow_other_weights)
    if meta.get("schedule") != schedule_text:
        raise PrtoolError(f"tokens {path} were tuned with schedule {meta.get('schedule')!r}, not {schedule_text!r}: "
                          "export with the tuning schedule, or tune for this one")
    made = meta.get("scorer")  # an unpruned schedule ("") ranks nothing, so its scorer does not matter
    if scorer is not None and made is not None and schedule_text and made != scorer:
        raise PrtoolError(f"tokens {path} were tuned with scorer {made!r}, not {scorer!r}: "
                          f"export with --scorer {made}, or tune for this scorer")
    sha = meta.get("predictor_sha256")  # absent in tokens written before it was recorded
    if sha and scorer == "predictor" and predictor_path:
        from prtool.util.files import sha256_file

        if sha256_file(predictor_path) != sha:
            raise PrtoolError(f"tokens {path} were tuned behind predictor {meta.get('predictor')} (sha256 {sha[:12]}), "
                              f"not {predictor_path}: export with that predictor, or tune for this one")
    learner = PromptLearner(model, tokenizer, meta["n_ctx"], meta["mode"], init=None, vision_width=vision_width)
    try:
        learner.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PrtoolError(f"tokens {path} do not fit this model ({str(exc).splitlines()[0]})") from None
    return learner.eval(), meta


def learner_classnames(tokens: Path) -> list[str]:
    """The class names the tokens at ``tokens`` were tuned with (from the config beside them)."""
    return json.loads(Path(tokens).with_suffix(".json").read_text())["classnames"]


def learner_synonyms(tokens: Path) -> list[list[str]] | None:
    """Names per class the tokens were tuned with (None for checkpoints written before synonyms)."""
    return json.loads(Path(tokens).with_suffix(".json").read_text()).get("class_synonyms")
