"""``prtool plan``'s search space, its analytic pruning and its measurement cache.

The space is methods x schedules: the number of stages, the block of the first stage and the tokens
removed in total (split evenly over evenly spaced stages, as ``--keep-ratio``/``--stages`` do).
The analytic FLOP model (:func:`prtool.encoder.flops.encoder_cost`) gives each candidate its ideal speedup,
which tells the search (:mod:`prtool.bench.plan_search`) where to start timing and which groups cannot
come near the budget.

The first stage of a method that ranks with the predictor sits at the predictor's rank block: a
predictor is trained against rankings computed at one block and refuses others
(``check_predictor_fits``); training one per block would need golden rankings per block, far more
work than the search itself. ToMe and EViT choose their tokens themselves, so their first stage
ranges over several blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for, tower_geometry
from prtool.encoder.flops import encoder_cost
from prtool.encoder.methods import get_method
from prtool.encoder.schedule import Schedule, derive_schedule
from prtool.errors import PrtoolError
from prtool.export.quantize import split_variant
from prtool.util.files import write_json_atomic


@dataclass(frozen=True)
class PlanMethod:
    """One searchable method: a method of ``prtool.encoder.methods``, its FP32 export or, with ``quantize``, that
    export quantized as ``prtool export --quantize`` does (``int8-dynamic``: no calibration data needed)."""

    name: str
    scorer: str
    uses_predictor: bool
    quantize: str | None = None
    max_stage_share: float = 1.0  # ToMe merges at most (n + 1) // 2 of the n patch tokens entering a stage

    def fits(self, schedule: Schedule) -> bool:
        n = schedule.num_patches
        for _, removed in schedule.stages:
            if removed > (n + 1) * self.max_stage_share:
                return False
            n -= removed
        return True


def _searched(name: str, **kw) -> PlanMethod:
    """``NAME`` or ``NAME+MODE`` of a method plan searches: its scorer, whether it needs the predictor, its mode."""
    base, mode = split_variant(name)
    method = get_method(base, "pareto")
    return PlanMethod(name, method.spec_name, method.needs == "predictor", mode, **kw)


PLAN_METHODS = {m.name: m for m in (
    _searched("patch-ranking"),
    _searched("patch-ranking-merge"),
    _searched("tome", max_stage_share=0.5),
    _searched("evit"),
    _searched("patch-ranking+int8-dynamic"),
    _searched("patch-ranking-merge+int8-dynamic"),
    _searched("tome+int8-dynamic", max_stage_share=0.5),
    _searched("evit+int8-dynamic"),
)}
BACKENDS = {"onnxruntime-cpu": "onnxruntime CPU"}


@dataclass(frozen=True)
class Candidate:
    method: str
    schedule: Schedule

    @property
    def label(self) -> str:
        return f"{self.method}@{self.schedule.to_string() or 'none'}"

    def spec(self, predictor: Path | None) -> EncoderSpec:
        m = PLAN_METHODS[self.method]
        return EncoderSpec(self.schedule, m.scorer, predictor if m.uses_predictor else None)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown or not methods:
        raise PrtoolError(f"--methods {text!r}: choose from {', '.join(PLAN_METHODS)}")
    return methods


def parse_numbers(text: str, option: str, kind=float, low: float = 0.0, high: float = float("inf")) -> list:
    """``"1,2,3"`` -> numbers, each in ``(low, high)``, or a one-line error naming ``option``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PrtoolError(f"{option} {text!r}: give comma-separated numbers") from None
    if not values or any(not low < v < high for v in values):
        raise PrtoolError(f"{option} {text!r}: every value must lie strictly between {low} and {high}")
    return values


def first_blocks(depth: int, uses_predictor: bool, rank_block: int) -> list[int]:
    """The predictor's rank block; else up to three blocks in the first half of the encoder."""
    if uses_predictor:
        return [rank_block]
    last = max(1, depth // 2)
    return sorted({round(1 + i * (last - 1) / 2) for i in range(3)})


def search_space(loaded, methods: list[str], stages: list[int], keep_ratios: list[float],
                 rank_block: int) -> list[Candidate]:
    """Every method x first block x stage count x keep ratio that makes a valid schedule."""
    n, depth, _ = tower_geometry(loaded)
    out = {}
    for m in methods:
        for first in first_blocks(depth, PLAN_METHODS[m].uses_predictor, rank_block):
            for s in stages:
                for keep in keep_ratios:
                    try:
                        sched = derive_schedule(keep, s, n, depth, first)
                    except PrtoolError:
                        continue  # too many stages for the blocks left, or fewer tokens removed than stages
                    if not sched.is_empty and PLAN_METHODS[m].fits(sched):
                        out.setdefault(Candidate(m, sched).label, Candidate(m, sched))
    return list(out.values())


def predicted(loaded, candidates: list[Candidate]) -> tuple[float, dict[str, dict]]:
    """Unpruned GFLOPs and, per candidate label, its GFLOPs and ideal speedup (FLOP ratio). Built
    with an untrained predictor: its cost equals a trained one's. A candidate its method refuses to
    build is left out."""
    base = encoder_cost(build_pruned_encoder(loaded, EncoderSpec(schedule_for(loaded, "none")))[0])["gflops"]
    out = {}
    for c in candidates:
        try:
            g = encoder_cost(build_pruned_encoder(loaded, c.spec(None))[0])["gflops"]
        except PrtoolError:
            continue
        out[c.label] = {"gflops": g, "ideal_speedup": base / g}
    return base, out


class PlanCache:
    """Measured latency and accuracy, one JSON file, rewritten atomically after every entry (a killed
    search loses at most the candidate it was measuring). Keys name everything a figure depends on."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.entries = dict(data["entries"])
            except (OSError, ValueError, KeyError, TypeError):
                raise PrtoolError(f"plan cache {self.path} is not a prtool plan cache: pass another --cache "
                                  "or delete it") from None

    @staticmethod
    def key(**parts) -> str:
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"format": "prtool-plan-cache/1", "entries": self.entries})


def weights_id(loaded) -> dict:
    """The model part of a cache key: architecture, weights tag and checkpoint sha256."""
    return {"model": loaded.name, "pretrained": loaded.pretrained, "sha256": loaded.checkpoint_sha256}
