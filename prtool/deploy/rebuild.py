"""Rebuild the PyTorch encoder an ONNX export was made from, out of its prtool manifest.

The manifest records the model, the weights (an open_clip tag, or a checkpoint's file name and
sha256), the schedule, scorer, predictor, gather mode and outputs. Weights that cannot be found
again are an error, never a silent substitute: random weights (``--pretrained none``) or an
untrained predictor cannot be rebuilt, and a checkpoint or predictor whose content differs from
the recorded one is refused naming both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prtool.errors import PrtoolError

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
        raise PrtoolError("the export was made from random weights (--pretrained none), which cannot be rebuilt to "
                          "compare against: pass --pretrained with the weights it was exported from")
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


def _predictor(manifest: dict, predictor: Path | None) -> Path:
    path = predictor or (Path(manifest["predictor"]) if manifest.get("predictor") else None)
    if path is None:
        raise PrtoolError("the export used an untrained (random) predictor, which cannot be rebuilt to compare "
                          "against: validate an export made with --predictor FILE")
    if not Path(path).exists():
        raise PrtoolError(f"the export's predictor {path} is not here: pass it with --predictor PATH")
    return Path(path)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def rebuild_encoder(manifest: dict, pretrained: str | None = None, predictor: Path | None = None) -> Rebuilt:
    """The fp32 PyTorch encoder described by an ONNX manifest (``pretrained``/``predictor`` override paths)."""
    from prtool.build import EncoderSpec, build_pruned_encoder, ranker_of, schedule_for
    from prtool.models import load_clip

    if not isinstance(manifest, dict) or manifest.get("kind") != ONNX_KIND:
        raise PrtoolError("this is not a prtool ONNX manifest: re-export with `prtool export`")
    if manifest.get("num_prefix_tokens", 1) != 1:
        raise PrtoolError("the export holds visual prompt tokens, which its manifest does not carry: "
                          "validate it with the code that made it")
    source = manifest["source"]
    weights = _weights(source, pretrained)
    loaded = load_clip(source["model"], weights)
    if source.get("checkpoint_sha256") and loaded.checkpoint_sha256 != source["checkpoint_sha256"]:
        raise PrtoolError(f"checkpoint {weights} has sha256 {str(loaded.checkpoint_sha256)[:12]}, but the export was made "
                          f"from {source.get('pretrained')} with sha256 {source['checkpoint_sha256'][:12]}: pass the same "
                          "weights with --pretrained")
    schedule = schedule_for(loaded, manifest["schedule"]["string"] or "none")
    scorer = manifest.get("scorer") or "predictor"
    pred_path = None
    if not schedule.is_empty and ranker_of(scorer) == "predictor":
        pred_path = _predictor(manifest, predictor)
    spec = EncoderSpec(schedule, scorer, pred_path, manifest.get("gather", "flat"), merge=manifest.get("merge"))
    outputs = [o["name"] for o in manifest["outputs"]]
    encoder, meta = build_pruned_encoder(loaded, spec, normalize=manifest["outputs"][0].get("l2_normalized", True),
                                         return_indices=len(outputs) > 1)
    if pred_path is not None and manifest.get("predictor_meta") and not _same(meta, manifest["predictor_meta"]):
        raise PrtoolError(f"predictor {pred_path} is not the one the export was made with (its config differs from "
                          "the manifest's predictor_meta): pass the same predictor with --predictor")
    return Rebuilt(encoder, loaded, outputs, f"{source['model']} / {Path(weights).name}")
