"""Assemble a ``PrunedVisionTransformer`` from user-level choices (model, schedule, scorer)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.models import LoadedModel
from prtool.predictor import check_predictor_fits, load_predictor, untrained_predictor
from prtool.pruned import PrunedVisionTransformer
from prtool.schedule import Schedule, resolve_schedule
from prtool.scorers import (
    BrightnessScorer,
    ClsAttentionScorer,
    GoldenScorer,
    PatchScorer,
    PredictorScorer,
    RandomScorer,
)


@dataclass
class EncoderSpec:
    """Everything that decides the pruned encoder's graph (recorded in manifests)."""

    schedule: Schedule
    scorer: str = "predictor"
    predictor_path: Path | None = None
    gather: str = "flat"
    seed: int = 0
    allow_other_weights: bool = False  # a predictor/tokens made for other weights of this architecture
    merge: dict | None = None  # rank-and-merge design (target, attention, merge_op); None = the shipped default

    @property
    def untrained_predictor(self) -> bool:
        return not self.schedule.is_empty and ranker_of(self.scorer) == "predictor" and self.predictor_path is None

    def to_dict(self) -> dict:
        predictor = str(self.predictor_path) if self.predictor_path else None
        out = {"schedule": self.schedule.to_dict(), "scorer": self.scorer if not self.schedule.is_empty else None,
               "predictor": "untrained" if self.untrained_predictor else predictor, "gather": self.gather}
        if self.merge:
            out["merge"] = dict(self.merge)
        if self.allow_other_weights:
            out["allow_other_weights"] = True
        return out


def ranker_of(scorer: str) -> str:
    """The scorer that ranks patches for ``scorer`` (``patch-ranking-merge`` -> ``predictor``)."""
    from prtool.rank_merge import MERGE_METHODS

    return MERGE_METHODS.get(scorer, scorer)


log = logging.getLogger(__name__)


def resolve_predictor(loaded: LoadedModel, schedule: Schedule, scorer: str, predictor: Path | None) -> Path | None:
    """The predictor file a command ranks with: ``predictor`` as given; for the shipped testbed
    checkpoint, the shipped testbed predictor (when the schedule starts at its rank block); else None,
    an untrained predictor, said in a warning. A predictor with an unpruned schedule is refused."""
    import json

    from prtool.testbed import spec as tbspec

    if predictor is not None and schedule.is_empty:
        raise PrtoolError(f"--predictor {predictor} needs a pruning schedule (without one nothing is pruned and the "
                          "predictor is unused): pass --schedule/-s with the first stage at the predictor's rank block, "
                          "or --keep-ratio")
    if predictor is not None or schedule.is_empty or ranker_of(scorer) != "predictor":
        return predictor
    shipped = tbspec.PREDICTOR_PATH
    why = "pass --predictor FILE (from `prtool train`) for accuracy"
    if loaded.name == tbspec.MODEL_NAME and shipped.exists():
        meta = json.loads(shipped.with_suffix(".json").read_text())
        if meta["model_id"].get("checkpoint_sha256") == loaded.checkpoint_sha256:
            if meta["rank_block"] == schedule.first_block:
                log.info("ranking with the shipped testbed predictor %s", shipped)
                return shipped
            why = (f"the shipped testbed predictor ranks at block {meta['rank_block']}, this schedule starts at block "
                   f"{schedule.first_block}")
    log.warning("warning: no --predictor: patches are ranked by an untrained (seeded random) predictor, fine for "
                "graphs and speed, not for accuracy (%s)", why)
    return None


def tower_geometry(loaded: LoadedModel) -> tuple[int, int, int]:
    """``(num_patches, depth, width)`` of the image tower."""
    v = loaded.visual
    return v.grid_size[0] * v.grid_size[1], len(v.transformer.resblocks), v.class_embedding.shape[0]


def schedule_for(loaded: LoadedModel, schedule: str | None = None, keep_ratio: float | None = None,
                 stages: int = 1, first_block: int | None = None) -> Schedule:
    n, depth, _ = tower_geometry(loaded)
    return resolve_schedule(schedule, keep_ratio, stages, first_block, n, depth)


def make_scorer(loaded: LoadedModel, spec: EncoderSpec) -> tuple[PatchScorer | None, dict | None]:
    """The scorer object and, for a trained predictor, its checkpoint metadata."""
    if spec.schedule.is_empty:
        return None, None
    n, _, width = tower_geometry(loaded)
    if spec.scorer == "predictor":
        if spec.predictor_path is None:
            # An untrained predictor: a valid graph for export and speed work, not for accuracy.
            return PredictorScorer(untrained_predictor(n, width)), None
        predictor, meta = load_predictor(spec.predictor_path)
        check_predictor_fits(meta, loaded.model_id, spec.schedule.first_block, n, width, spec.predictor_path,
                             spec.allow_other_weights)
        return PredictorScorer(predictor), meta
    if spec.predictor_path is not None:
        raise PrtoolError(f"--predictor is only used with --scorer predictor, not {spec.scorer}")
    if spec.scorer == "cls-attn":
        return ClsAttentionScorer(), None
    if spec.scorer == "random":
        return RandomScorer(spec.seed), None
    if spec.scorer == "golden":
        return GoldenScorer(), None
    if spec.scorer == "brightness":
        return BrightnessScorer(), None
    raise PrtoolError(f"unknown scorer {spec.scorer!r}: use predictor, cls-attn, evit, tome, patch-ranking-merge, "
                      "cls-attn-merge, random, golden or brightness")


def build_pruned_encoder(loaded: LoadedModel, spec: EncoderSpec, normalize: bool = True,
                         return_indices: bool = False, visual_prompts=None) -> tuple[PrunedVisionTransformer, dict | None]:
    from prtool.peers import PEERS
    from prtool.rank_merge import MERGE_METHODS, RankMergeVisionTransformer

    if spec.scorer in MERGE_METHODS and not spec.schedule.is_empty:
        scorer, meta = make_scorer(loaded, replace(spec, scorer=MERGE_METHODS[spec.scorer]))
        enc = RankMergeVisionTransformer(loaded.visual, spec.schedule, scorer, gather=spec.gather, normalize=normalize,
                                         return_indices=return_indices, visual_prompts=visual_prompts,
                                         **(spec.merge or {}))
        return enc.eval(), meta
    if spec.scorer in ("avit", "avit-topk") and not spec.schedule.is_empty:  # A-ViT (#23): prtool.avit
        from prtool.avit_train import build_avit

        return build_avit(loaded, spec, normalize, return_indices, visual_prompts), None
    if spec.scorer in PEERS and not spec.schedule.is_empty:
        if return_indices:
            raise PrtoolError(f"{spec.scorer} merges or fuses tokens: it has no kept_patch_indices output")
        enc = PEERS[spec.scorer](loaded.visual, spec.schedule, gather=spec.gather, normalize=normalize,
                                 visual_prompts=visual_prompts)
        return enc.eval(), None
    scorer, meta = make_scorer(loaded, spec)
    enc = PrunedVisionTransformer(loaded.visual, spec.schedule, scorer, gather=spec.gather, normalize=normalize,
                                  return_indices=return_indices, visual_prompts=visual_prompts)
    return enc.eval(), meta
