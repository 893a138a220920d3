"""``prtool export-text``: the text encoder (with learned context, if any) as ONNX, so consumers
embed new class names themselves.

Input ``input_ids`` int64 ``[batch, context_length]``: the open_clip tokenization of
``"X X ... X {classname}."`` (``n_ctx`` placeholders; none without tokens). The graph replaces the
placeholder embeddings by the learned context. Output ``text_embeds`` float32 ``[batch, E]``, L2-normalized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prtool.encoder.models import LoadedModel
from prtool.errors import PrtoolError
from prtool.export.artifacts import check_output_dir, staged_outputs
from prtool.export.io_names import BATCH_AXIS, TEXT_EMBEDS, TEXT_IDS
from prtool.export.manifest import package_versions
from prtool.tuning.prompts import PLACEHOLDER, encode_text_embeddings
from prtool.util.files import sha256_file, write_json_atomic


class TextEncoder(nn.Module):
    def __init__(self, model, ctx: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.n_ctx = 0 if ctx is None else int(ctx.shape[0])
        if ctx is not None:
            self.register_buffer("ctx", ctx.detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.token_embedding(input_ids)
        if self.n_ctx:
            ctx = self.ctx.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
            emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)
        return F.normalize(encode_text_embeddings(self.model, emb, input_ids), dim=-1)


def export_text(loaded: LoadedModel, out: Path, tokens: Path | None = None, classnames: list[str] | None = None,
                opset: int = 18, atol: float = 1e-4, allow_other_weights: bool = False) -> dict:
    """Export, check against PyTorch on the class prompts, and write ``out`` + manifest atomically."""
    from prtool.export.onnx_export import mha_fastpath_disabled
    from prtool.runtime.session import ort_session

    out = Path(out)
    check_output_dir(out)
    tokenizer = loaded.tokenizer()
    ctx, n_ctx = None, 0
    if tokens is not None:
        from prtool.tuning.prompts import learner_classnames, read_tokens

        state, _ = read_tokens(tokens, loaded.model_id, allow_other_weights)
        ctx = state["ctx"]
        n_ctx = int(ctx.shape[0])
        classnames = classnames or learner_classnames(tokens)
        if ctx.shape[1] != loaded.model.token_embedding.weight.shape[1]:
            raise PrtoolError(f"tokens {tokens} have width {ctx.shape[1]}, not this text encoder's")
        if n_ctx == 0:
            ctx = None
    classnames = classnames or ["cat", "dog"]
    prefix = " ".join([PLACEHOLDER] * n_ctx)
    ids = tokenizer([f"{prefix} {c}.".strip() for c in classnames])
    enc = TextEncoder(loaded.model, ctx).eval()
    with staged_outputs(out) as tmpdir:
        tmp = tmpdir / out.name
        example = ids[:2] if len(ids) >= 2 else ids.repeat(2, 1)
        with mha_fastpath_disabled(), torch.no_grad():
            torch.onnx.export(enc, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=[TEXT_IDS],
                              output_names=[TEXT_EMBEDS],
                              dynamic_axes={TEXT_IDS: {0: BATCH_AXIS}, TEXT_EMBEDS: {0: BATCH_AXIS}})
            ref = enc(ids).numpy()
        got = ort_session(tmp).run(None, {TEXT_IDS: ids.numpy().astype(np.int64)})[0]
        err = _check_text(got, ref, atol, classnames)
        manifest = {"prtool_manifest": 1, "kind": "onnx-text-encoder", "source": loaded.model_id,
                    "inputs": [{"name": TEXT_IDS, "dtype": "int64", "shape": [BATCH_AXIS, int(ids.shape[1])],
                                "meaning": f"open_clip tokens of '{(prefix + ' ').lstrip()}{{classname}}.'"}],
                    "outputs": [{"name": TEXT_EMBEDS, "dtype": "float32", "shape": [BATCH_AXIS, int(ref.shape[1])],
                                 "l2_normalized": True}],
                    "n_ctx": n_ctx, "tokens": str(tokens) if tokens else None,
                    "tokens_sha256": sha256_file(tokens) if tokens else None,
                    **({"allow_other_weights": True} if allow_other_weights else {}),
                    "validation": {"classnames": classnames, "max_abs": err, "atol": atol},
                    "opset": opset, "versions": package_versions(), "onnx_sha256": sha256_file(tmp)}
        write_json_atomic(tmpdir / out.with_suffix(".json").name, manifest)
    return {"onnx": str(out), "manifest": str(out.with_suffix(".json")), "max_abs": err, "n_ctx": n_ctx}


def _check_text(got: np.ndarray, ref: np.ndarray, atol: float, classnames: list[str]) -> float:
    """The text export's one check (max abs difference on the class prompts); raises when it fails."""
    from prtool.export.validate import FIXES, ValidationReport

    err = float(np.abs(got - ref).max())
    report = ValidationReport(images=f"{len(classnames)} class prompts")
    report.add(f"{TEXT_EMBEDS} vs PyTorch", err <= atol, f"max abs {err:.2e} (atol {atol})", FIXES["values"])
    report.raise_if_failed("the text export", "the library's export_text(atol=...) sets the tolerance")
    return err
