"""The method table: every user-facing method name, what builds it, whether it exports, what it needs,
how its FLOPs are counted.

A *method* is what the encoder does with the tokens: nothing (``none``), keep the top-ranked patches
(``patch-ranking``, ``cls-attn``, ...), keep them and merge the rest (``patch-ranking-merge``, ...),
reduce the tokens by its own rule (the peers ``evit``, ``tome``; ``static``, the fixed-slice timing
twin). A *ranker* (``RANKERS``; classes in ``prtool.encoder.scorers``) is what orders the patches for the
methods that rank: ``predictor``, ``cls-attn``, ``random`` and the oracles ``golden`` and
``brightness``. ``EncoderSpec.scorer`` holds a method as recorded in manifests (``--scorer``);
eval, bench, demo, export and the CLI help all read this table. Adding a method is its encoder
class (a ``PrunedVisionTransformer`` subclass with ``from_spec``) plus one ``Method`` entry.

Light on purpose (no torch at import): the CLI builds its help from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from prtool.encoder import flops
from prtool.errors import PrtoolError

CONTEXTS = ("encoder", "accuracy", "speed", "pareto")


@dataclass(frozen=True)
class Ranker:
    """What orders the patches: ``scorer`` is its class in ``prtool.encoder.scorers``."""

    name: str
    scorer: str
    needs: str | None = None  # "predictor" (--predictor FILE) or "rankings" (--rankings DIR)
    exports: bool = True
    why_not_exported: str = ""
    seeded: bool = False  # benches average it over --seeds

    def scorer_class(self) -> type:
        return getattr(importlib.import_module("prtool.encoder.scorers"), self.scorer)


RANKERS = {r.name: r for r in (
    Ranker("predictor", "PredictorScorer", needs="predictor"),
    Ranker("cls-attn", "ClsAttentionScorer"),
    Ranker("random", "RandomScorer", exports=False, seeded=True,
           why_not_exported="random keep is a PyTorch-only baseline (ONNX random ops are not reproducible "
                            "across runtimes)"),
    Ranker("golden", "GoldenScorer", needs="rankings", exports=False,
           why_not_exported="the golden ranking is an oracle computed per image offline; export a trained predictor"),
    Ranker("brightness", "BrightnessScorer", exports=False,
           why_not_exported="brightness is an evaluation heuristic computed from pixels, not a deployable scorer"),
)}

_PRUNED = "prtool.encoder.pruned:PrunedVisionTransformer"
_RANK_MERGE = "prtool.encoder.rank_merge:RankMergeVisionTransformer"


@dataclass(frozen=True)
class Method:
    """One user-facing method. ``encoder`` is ``module:Class``, built by the class's ``from_spec``."""

    name: str
    summary: str
    encoder: str = _PRUNED
    ranker: str | None = None  # a RANKERS name; None: the method picks tokens itself (or keeps all)
    flops: Callable[[object], int] = flops.no_selection_macs  # MACs it spends choosing/merging tokens
    exports: bool = True  # the encoder exports to ONNX (its ranker must too: see ``exportable``)
    scored: bool = True  # its accuracy means something (benches score it)
    timed_by: str | None = None  # bench pareto: the method whose export times it when it cannot export
    aliases: tuple[str, ...] = ()
    recorded: str = ""  # what EncoderSpec.scorer and manifests record, when not ``name``
    builder: str = ""  # ``module:function(loaded, spec, normalize, return_indices, visual_prompts)``, for an
    # encoder that needs more than ``from_spec`` gets (A-ViT: its tuned weights, checked against the model)

    @property
    def spec_name(self) -> str:
        return self.recorded or self.name

    @property
    def needs(self) -> str | None:
        return RANKERS[self.ranker].needs if self.ranker else None

    @property
    def seeded(self) -> bool:
        return bool(self.ranker) and RANKERS[self.ranker].seeded

    @property
    def exportable(self) -> bool:
        return self.exports and (self.ranker is None or RANKERS[self.ranker].exports)

    @property
    def why_not_exported(self) -> str:
        return RANKERS[self.ranker].why_not_exported if self.ranker else f"{self.name} has no ONNX export"

    @property
    def merges(self) -> bool:
        return self.encoder == _RANK_MERGE

    def encoder_class(self) -> type:
        module, cls = self.encoder.split(":")
        return getattr(importlib.import_module(module), cls)

    def build(self, loaded, spec, scorer, **kw):
        """The encoder of ``spec``: the ``builder`` when there is one, else the class's ``from_spec``."""
        if self.builder:
            module, fn = self.builder.split(":")
            return getattr(importlib.import_module(module), fn)(loaded, spec, **kw)
        return self.encoder_class().from_spec(loaded.visual, spec, scorer, **kw)

    def accepted_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, *self.aliases, self.spec_name)))

    def in_context(self, context: str) -> bool:
        """Whether ``context`` (``encoder``: --scorer; or a bench) accepts this method."""
        return {"encoder": self.name != "none", "accuracy": self.scored, "speed": self.exportable,
                "pareto": self.scored and (self.exportable or self.timed_by is not None)}[context]


def _merged(ranker: str, summary: str, **kw) -> Method:
    return Method(f"{'patch-ranking' if ranker == 'predictor' else ranker}-merge", summary, _RANK_MERGE, ranker,
                  flops.rank_merge_selection_macs, **kw)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "unpruned: every patch token through every block", aliases=("baseline",)),
    Method("patch-ranking", "Patch Ranking: the trained predictor ranks, TopK + Gather keep",
           ranker="predictor", recorded="predictor"),
    Method("cls-attn", "keep the patches CLS attends to most", ranker="cls-attn"),
    Method("random", "keep random patches (seeded baseline)", ranker="random"),
    Method("golden", "keep by each image's golden ranking (oracle, from a rankings store)", ranker="golden"),
    Method("brightness", "keep the brightest patches (pixel heuristic)", ranker="brightness"),
    Method("evit", "EViT: keep by CLS attention, fuse the rest into one token",
           "prtool.encoder.peers:EViTVisionTransformer", flops=flops.evit_selection_macs),
    Method("tome", "ToMe: bipartite soft matching merges tokens, proportional attention",
           "prtool.encoder.peers:ToMeVisionTransformer", flops=flops.tome_selection_macs),
    Method("static", "keep the first k patches by index (timing twin of patch-ranking)",
           "prtool.encoder.peers:StaticKeepVisionTransformer", scored=False),
    _merged("predictor", "rank-and-merge: the predictor ranks once, the dropped tokens are fused"),
    _merged("cls-attn", "rank-and-merge ranked by CLS attention"),
    _merged("random", "rank-and-merge ranked at random", timed_by="patch-ranking-merge"),
    _merged("golden", "rank-and-merge ranked by the golden oracle", timed_by="patch-ranking-merge"),
    Method("avit", "A-ViT: adaptive token halting, halted tokens masked (A-ViT proper; no speedup)",
           "prtool.encoder.avit:AViTVisionTransformer", builder="prtool.encoder.avit:build_avit"),
    Method("avit-topk", "A-ViT, fixed-k form: TopK by cumulative halting score at the schedule's blocks",
           "prtool.encoder.avit:AViTTopKVisionTransformer", builder="prtool.encoder.avit:build_avit"),
)}


def names(context: str) -> tuple[str, ...]:
    """Every name ``context`` accepts (aliases included), in table order."""
    return tuple(n for m in METHODS.values() if m.in_context(context) for n in m.accepted_names())


def help_names(context: str) -> str:
    """``none (baseline), patch-ranking (predictor), ...``: the methods ``context`` accepts, aliases in
    parentheses; with ``encoder``, the ones that cannot be exported marked."""
    out = []
    for m in METHODS.values():
        if m.in_context(context):
            alias = [n for n in m.accepted_names() if n != m.name]
            tag = ", ".join(alias) + ("; eval only" if context == "encoder" and not m.exportable else "")
            out.append(m.name + (f" ({tag.lstrip('; ')})" if tag else ""))
    return ", ".join(out)


def get_method(name: str, context: str = "encoder") -> Method:
    """The method called ``name`` (or an alias) in ``context``; an unknown name lists the accepted ones."""
    for m in METHODS.values():
        if name in m.accepted_names() and m.in_context(context):
            return m
    what = {"encoder": "--scorer", "speed": "variant"}.get(context, "method")
    raise PrtoolError(f"unknown {what} {name!r}: use one of {help_names(context)}")


def ranker_of(name: str) -> str | None:
    """The ranker behind method ``name`` (``patch-ranking-merge`` -> ``predictor``; ``tome`` -> None)."""
    return get_method(name).ranker


def merged_variant(name: str) -> Method:
    """The rank-and-merge method ranked like ``name`` (``predictor`` -> ``patch-ranking-merge``)."""
    ranker = get_method(name).ranker
    for m in METHODS.values():
        if m.merges and m.ranker == ranker:
            return m
    raise PrtoolError(f"method {name} has no rank-and-merge variant")
