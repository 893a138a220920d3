"""Rebuild the PyTorch encoder an ONNX export was made from, out of its prtool manifest.

The manifest records the model, the weights (an open_clip tag, or a checkpoint's file name and
sha256), the schedule, scorer, predictor, tokens, classifier head, gather mode and outputs. Random
weights (``--pretrained none``) and an untrained predictor are seeded, so they rebuild identically.
Weights that cannot be found again are an error, never a silent substitute: a checkpoint, predictor
or tokens file whose content differs from the recorded one is refused naming both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.export.io_names import KEPT_INDICES, LOGITS

ONNX_KIND = "onnx-image-encoder"


@dataclass
class Rebuilt:
    encoder: object  # PrunedVisionTransformer, eval mode
    loaded: object  # LoadedModel
    output_names: list[str]
    weights: str  # what was loaded, for the report


def _weights(source: dict, pretrained: str | None) -> str:
    recorded, sha = source.get("pretrained"), source.get("checkpoint_sha256")
    if pretrained is not None:
        return pretrained
    if recorded in (None, "none"):
        return "none"  # seeded random weights: the same in every process
    if sha is None:
        return recorded  # an open_clip pretrained tag
    from prtool.testbed import spec as tbspec

    candidates = [Path(recorded)]
    if source.get("model") == tbspec.MODEL_NAME and tbspec.CHECKPOINT_PATH.name == recorded:
        candidates.append(tbspec.CHECKPOINT_PATH)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise PrtoolError(f"the export was made from checkpoint {recorded} (sha256 {sha[:12]}), which is not here: "
                          "pass it with --pretrained PATH")
    return str(found)


def _predictor(manifest: dict, predictor: Path | None) -> Path | None:
    recorded = manifest.get("predictor")
    if predictor is None and recorded == "untrained":
        return None  # seeded, so it rebuilds identically
    path = predictor or (Path(recorded) if recorded else None)
    if path is None:
        raise PrtoolError("the export used an unseeded untrained predictor (made before prtool seeded it), which "
                          "cannot be rebuilt: re-export it, or validate an export made with --predictor FILE")
    if not Path(path).exists():
        raise PrtoolError(f"the export's predictor {path} is not here: pass it with --predictor PATH")
    return Path(path)


def _tokens(manifest: dict, tokens: Path | None) -> Path | None:
    """The tokens file an export baked in (``tokens`` overrides the recorded path), checked by sha256."""
    from prtool.util.files import sha256_file

    recorded = manifest.get("tokens")
    if not recorded:
        if tokens is not None:
            raise PrtoolError(f"--tokens {tokens} given, but the export was made without tokens")
        return None
    path = Path(tokens or recorded["file"])
    if not path.is_file():
        raise PrtoolError(f"the export's tokens {recorded['file']} are not here: pass them with --tokens PATH")
    sha = sha256_file(path)
    if recorded.get("sha256") and sha != recorded["sha256"]:
        raise PrtoolError(f"tokens {path} have sha256 {sha[:12]}, but the export baked in {recorded['file']} with "
                          f"sha256 {recorded['sha256'][:12]}: pass the same tokens with --tokens")
    return path


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _classifier_data(manifest: dict):
    from prtool.data.datasets import load_dataset

    data = manifest.get("classifier_data")
    if not data:
        raise PrtoolError("the export's classifier head does not record where its class names came from (exported "
                          "before prtool recorded it): re-export it")
    return load_dataset(data, "test")


def rebuild_encoder(manifest: dict, pretrained: str | None = None, predictor: Path | None = None,
                    tokens: Path | None = None) -> Rebuilt:
    """The fp32 PyTorch encoder described by an ONNX manifest (``pretrained``/``predictor``/``tokens``
    override paths), with its visual tokens and classifier head."""
    from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
    from prtool.encoder.methods import ranker_of
    from prtool.encoder.models import load_clip
    from prtool.export.onnx_export import WithClassifier

    if not isinstance(manifest, dict) or manifest.get("kind") != ONNX_KIND:
        raise PrtoolError("this is not a prtool ONNX manifest: re-export with `prtool export`")
    tokens_path = _tokens(manifest, tokens)
    if manifest.get("num_prefix_tokens", 1) != 1 and tokens_path is None:
        raise PrtoolError("the export holds visual prompt tokens, but its manifest records no tokens file: "
                          "validate it with the code that made it")
    source = manifest["source"]
    weights = _weights(source, pretrained)
    loaded = load_clip(source["model"], weights)
    if source.get("checkpoint_sha256") and loaded.checkpoint_sha256 != source["checkpoint_sha256"]:
        raise PrtoolError(f"checkpoint {weights} has sha256 {str(loaded.checkpoint_sha256)[:12]}, but the export was "
                          f"made from {source.get('pretrained')} with sha256 {source['checkpoint_sha256'][:12]}: pass "
                          "the same weights with --pretrained")
    schedule = schedule_for(loaded, manifest["schedule"]["string"] or "none")
    scorer = manifest.get("scorer") or "predictor"
    pred_path = None
    if not schedule.is_empty and ranker_of(scorer) == "predictor":
        pred_path = _predictor(manifest, predictor)
    spec = EncoderSpec(schedule, scorer, pred_path, manifest.get("gather", "flat"),
                       allow_other_weights=bool(manifest.get("allow_other_weights")), merge=manifest.get("merge"))
    outputs = [o["name"] for o in manifest["outputs"]]
    extras = {"visual_prompts": None, "class_embeds": None}
    if tokens_path is not None or LOGITS in outputs:
        from prtool.tuning.tune import export_extras

        data = _classifier_data(manifest) if LOGITS in outputs and tokens_path is None else None
        extras = export_extras(loaded, spec, tokens_path, LOGITS in outputs, data)
    encoder, meta = build_pruned_encoder(loaded, spec, normalize=manifest["outputs"][0].get("l2_normalized", True),
                                         return_indices=KEPT_INDICES in outputs,
                                         visual_prompts=extras["visual_prompts"])
    if extras["class_embeds"] is not None:
        encoder = WithClassifier(encoder, extras["class_embeds"], float(loaded.model.logit_scale.detach().exp())).eval()
    if pred_path is not None and manifest.get("predictor_meta") and not _same(meta, manifest["predictor_meta"]):
        raise PrtoolError(f"predictor {pred_path} is not the one the export was made with (its config differs from "
                          "the manifest's predictor_meta): pass the same predictor with --predictor")
    return Rebuilt(encoder, loaded, outputs, f"{source['model']} / {Path(weights).name}")
