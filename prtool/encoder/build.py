"""Assemble a ``PrunedVisionTransformer`` from user-level choices (model, schedule, method:
``prtool.encoder.methods``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prtool.encoder.methods import METHODS, RANKERS, Method, get_method, ranker_of
from prtool.encoder.models import LoadedModel
from prtool.encoder.pruned import PrunedVisionTransformer
from prtool.encoder.schedule import Schedule, resolve_schedule
from prtool.encoder.scorers import PatchScorer
from prtool.errors import PrtoolError


@dataclass
class EncoderSpec:
    """Everything that decides the pruned encoder's graph (recorded in manifests)."""

    schedule: Schedule
    scorer: str = "predictor"  # the method (prtool.encoder.methods), as manifests record it (--scorer)
    predictor_path: Path | None = None
    gather: str = "flat"
    seed: int = 0
    allow_other_weights: bool = False  # a predictor/tokens made for other weights of this architecture
    merge: dict | None = None  # rank-and-merge design (target, attention, merge_op); None = the shipped default

    def __post_init__(self):
        self.scorer = get_method(self.scorer).spec_name  # an alias ("patch-ranking") is recorded by its name

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


log = logging.getLogger(__name__)


def resolve_predictor(loaded: LoadedModel, schedule: Schedule, scorer: str, predictor: Path | None) -> Path | None:
    """The predictor file a command ranks with: ``predictor`` as given; for the shipped testbed
    checkpoint, the shipped testbed predictor (when the schedule starts at its rank block); else None,
    an untrained predictor, said in a warning. A predictor with an unpruned schedule is refused."""
    import json

    from prtool.testbed import spec as tbspec

    if predictor is not None and schedule.is_empty:
        raise PrtoolError(f"--predictor {predictor} needs a pruning schedule (without one nothing is pruned and the "
                          "predictor is unused): pass --schedule/-s with the first stage at the predictor's rank "
                          "block, or --keep-ratio")
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


def method_spec(method: Method, schedule: Schedule, predictor: Path | None = None, seed: int = 0,
                merge: dict | None = None) -> EncoderSpec:
    """The spec of ``method`` at ``schedule`` (``none``: unpruned), given ``predictor`` only if it ranks by one."""
    if method.name == "none":
        return EncoderSpec(Schedule((), schedule.num_patches, schedule.depth))
    return EncoderSpec(schedule, method.spec_name, predictor if method.needs == "predictor" else None, seed=seed,
                       merge=merge)


def make_scorer(loaded: LoadedModel, spec: EncoderSpec) -> tuple[PatchScorer | None, dict | None]:
    """The ranker object of ``spec``'s method (None when unpruned or the method ranks nothing) and, for a
    trained predictor, its checkpoint metadata."""
    name = ranker_of(spec.scorer)
    if spec.schedule.is_empty or name is None:
        return None, None
    ranker = RANKERS[name]
    if spec.predictor_path is not None and ranker.needs != "predictor":
        by_predictor = [m.spec_name for m in METHODS.values() if m.needs == "predictor"]
        raise PrtoolError(f"--predictor is only used with --scorer {' or '.join(by_predictor)}, not {spec.scorer}")
    return ranker.scorer_class().from_spec(loaded, spec)


def build_pruned_encoder(loaded: LoadedModel, spec: EncoderSpec, normalize: bool = True, return_indices: bool = False,
                         visual_prompts=None) -> tuple[PrunedVisionTransformer, dict | None]:
    """The encoder of ``spec``'s method (``METHODS``); ``encoder.method`` is its table entry (its FLOPs rule)."""
    method = METHODS["none"] if spec.schedule.is_empty else get_method(spec.scorer)
    scorer, meta = make_scorer(loaded, spec)
    enc = method.build(loaded, spec, scorer, normalize=normalize, return_indices=return_indices,
                       visual_prompts=visual_prompts)
    enc.method = method
    return enc.eval(), meta
