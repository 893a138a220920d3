"""Assemble a ``PrunedVisionTransformer`` from user-level choices (model, schedule, scorer)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prtool.errors import PrtoolError
from prtool.models import LoadedModel
from prtool.predictor import PredictorConfig, RankingPredictor, check_predictor_fits, load_predictor
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
    merge: dict | None = None  # rank-and-merge design (target, attention, merge_op); None = the shipped default

    def to_dict(self) -> dict:
        out = {"schedule": self.schedule.to_dict(), "scorer": self.scorer if not self.schedule.is_empty else None,
               "predictor": str(self.predictor_path) if self.predictor_path else None, "gather": self.gather}
        if self.merge:
            out["merge"] = dict(self.merge)
        return out


def ranker_of(scorer: str) -> str:
    """The scorer that ranks patches for ``scorer`` (``patch-ranking-merge`` -> ``predictor``)."""
    from prtool.rank_merge import MERGE_METHODS

    return MERGE_METHODS.get(scorer, scorer)


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
            return PredictorScorer(RankingPredictor(PredictorConfig(n, width)).eval()), None
        predictor, meta = load_predictor(spec.predictor_path)
        check_predictor_fits(meta, loaded.model_id, spec.schedule.first_block, n, width, spec.predictor_path)
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
