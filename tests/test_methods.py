"""The method table (prtool.encoder.methods): complete, reachable from the CLI, the one source of names, needs,
export rules and FLOPs rules."""

import dataclasses
import re

import pytest
import torch
from conftest import cli

from prtool.encoder import methods
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, method_spec, schedule_for
from prtool.encoder.flops import encoder_cost, merge_selection_macs, peer_selection_macs
from prtool.encoder.scorers import PatchScorer
from prtool.errors import PrtoolError

# The option of each CLI command that takes method names, and the table context it reads.
OPTIONS = {("eval", "--scorer"): "encoder", ("export", "--scorer"): "encoder", ("tune", "--scorer"): "encoder",
           ("bench prompts", "--scorer"): "encoder", ("bench accuracy", "--methods"): "accuracy",
           ("bench speed", "--variants"): "speed", ("bench pareto", "--methods"): "pareto"}


def _listed(text: str) -> set[str]:
    """The names in a ``help_names`` list: each method and its aliases in parentheses."""
    out = set()
    for item in re.findall(r"[\w-]+(?: \([^)]*\))?", text):
        name, _, rest = item.partition(" (")
        out.add(name)
        out.update(a.strip() for a in rest.rstrip(")").replace(";", ",").split(",") if a.strip() != "eval only"
                   and a.strip())
    return out


def _cli_help() -> dict:
    import typer

    from prtool.cli.app import app

    root = typer.main.get_command(app)
    found = {}
    for (command, option), _ in OPTIONS.items():
        cmd = root
        for part in command.split():
            cmd = cmd.commands[part]
        found[(command, option)] = next(p.help for p in cmd.params if option in p.opts)
    return found


def test_every_cli_name_builds(tiny, tiny_pixels):
    sched = schedule_for(tiny, "1:16,2:16")
    for context in methods.CONTEXTS:
        for name in methods.names(context):
            method = methods.get_method(name, context)
            if method.builder:  # tuned per model (A-ViT): refused, naming the command, for a model without them
                with pytest.raises(PrtoolError, match="prtool tune-avit"):
                    build_pruned_encoder(tiny, method_spec(method, sched))
                continue
            enc, _ = build_pruned_encoder(tiny, method_spec(method, sched))
            assert enc.method is method
            assert enc.schedule.is_empty == (method.name == "none")
            oracle = enc.scorer is not None and type(enc.scorer).image_scores is not PatchScorer.image_scores
            if not oracle:  # oracle rankers score outside the graph: test_oracle_rankers_live_with_rankers
                with torch.no_grad():
                    assert enc(tiny_pixels[:2]).shape == (2, tiny.model.visual.output_dim)


# The names each command accepted before the table (README, benchmarks/suites/*.toml, recipes): still accepted.
OLD_NAMES = {
    "encoder": "predictor cls-attn random golden brightness evit tome static patch-ranking-merge cls-attn-merge "
               "random-merge golden-merge",
    "accuracy": "none patch-ranking golden random cls-attn evit tome brightness patch-ranking-merge golden-merge "
                "random-merge cls-attn-merge",
    "speed": "baseline patch-ranking static cls-attn evit tome patch-ranking-merge cls-attn-merge",
    "pareto": "none patch-ranking patch-ranking-merge tome evit random-merge golden-merge cls-attn-merge cls-attn",
}


ADDED_SINCE = "avit avit-topk"  # methods added after the table (#23): every context accepts both forms


@pytest.mark.parametrize("context", methods.CONTEXTS)
def test_old_names_still_accepted(context):
    canonical = {methods.get_method(n, context).name for n in (OLD_NAMES[context] + " " + ADDED_SINCE).split()}
    assert canonical == {methods.get_method(n, context).name for n in methods.names(context)}
    for name in methods.names(context):  # what a context accepts, it can run
        method = methods.get_method(name, context)
        if context == "speed":
            assert method.exportable, name
        if context == "pareto":
            assert method.scored and (method.exportable or methods.get_method(method.timed_by, "pareto")), name


def test_every_table_entry_is_in_the_cli_help():
    helps = _cli_help()
    for (command, option), context in OPTIONS.items():
        assert methods.help_names(context) in helps[(command, option)], (command, option)
        assert _listed(methods.help_names(context)) == set(methods.names(context))
    reachable = {n for (key, context) in OPTIONS.items() for n in methods.names(context)}
    for method in methods.METHODS.values():
        assert method.name in reachable, method.name
    for ranker in methods.RANKERS:
        assert any(m.ranker == ranker for m in methods.METHODS.values()), ranker


@pytest.mark.parametrize("context", methods.CONTEXTS)
def test_unknown_name_lists_exactly_the_accepted_names(context):
    with pytest.raises(PrtoolError) as exc:
        methods.get_method("no-such-method", context)
    listed = _listed(str(exc.value).split("use one of ", 1)[1])
    assert listed == set(methods.names(context))
    for name in listed:
        assert methods.get_method(name, context).in_context(context)


def test_unknown_scorer_on_the_cli_is_one_line(capsys):
    code, out, err = cli(capsys, "eval", "-m", "prtool-tiny", "-p", "none", "-s", "1:8", "--scorer", "nope")
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "unknown --scorer 'nope'" in line
    assert _listed(line.split("use one of ", 1)[1]) == set(methods.names("encoder"))


def test_aliases_keep_the_old_names(tiny):
    sched = schedule_for(tiny, "1:8")
    assert EncoderSpec(sched, "patch-ranking").scorer == "predictor"  # manifests keep recording "predictor"
    assert methods.get_method("baseline", "speed").name == "none"
    assert methods.get_method("none", "accuracy").name == "none"
    with pytest.raises(PrtoolError, match="unknown --scorer 'none'"):
        EncoderSpec(sched, "none")
    assert methods.merged_variant("predictor").name == "patch-ranking-merge"
    assert methods.merged_variant("cls-attn").name == "cls-attn-merge"


def test_flops_come_from_the_table(tiny, monkeypatch):
    sched = schedule_for(tiny, "1:16,2:16")
    expected = {"evit": peer_selection_macs("evit", sched, 32), "tome": peer_selection_macs("tome", sched, 32)}
    for method in methods.METHODS.values():
        if method.builder:  # needs weights tuned for the model (A-ViT); none for this tiny one
            continue
        enc, _ = build_pruned_encoder(tiny, method_spec(method, sched))
        got = round(encoder_cost(enc)["selection_gmacs"] * 1e9)
        if method.merges:
            want = merge_selection_macs(sched, 32, "fused", enc.transformer.resblocks[0].attn.num_heads)
        else:
            want = expected.get(method.name, 0)
        assert got == want, method.name
    patched = dict(methods.METHODS, tome=dataclasses.replace(methods.METHODS["tome"], flops=lambda enc: 12345))
    monkeypatch.setattr(methods, "METHODS", patched)
    enc, _ = build_pruned_encoder(tiny, EncoderSpec(sched, "tome"))
    assert round(encoder_cost(enc)["selection_gmacs"] * 1e9) == 12345


def test_export_refusal_comes_from_the_table(tiny, tmp_path):
    from prtool.export.onnx_export import ExportOptions, export_onnx

    sched = schedule_for(tiny, "1:16")
    refused = [m for m in methods.METHODS.values() if not m.exportable]
    assert {m.name for m in refused} == {"random", "golden", "brightness", "random-merge", "golden-merge"}
    for method in refused:
        with pytest.raises(PrtoolError, match=f"method {method.name} cannot be exported: "
                                              f"{re.escape(methods.RANKERS[method.ranker].why_not_exported)}"):
            export_onnx(tiny, method_spec(method, sched), tmp_path / "x.onnx", ExportOptions(validate=False))
    assert not list(tmp_path.iterdir())


def test_needs_come_from_the_rankers():
    needs = {m.name: m.needs for m in methods.METHODS.values() if m.needs}
    assert needs == {"patch-ranking": "predictor", "patch-ranking-merge": "predictor", "golden": "rankings",
                     "golden-merge": "rankings"}
    assert {m.name for m in methods.METHODS.values() if m.seeded} == {"random", "random-merge"}


def test_oracle_rankers_live_with_rankers(tiny, tiny_pixels):
    sched = schedule_for(tiny, "1:16")
    golden, _ = build_pruned_encoder(tiny, EncoderSpec(sched, "golden"))
    with pytest.raises(PrtoolError, match="needs --rankings DIR"):
        golden.scorer.image_scores(tiny, None, None, sched.first_block)
    bright, _ = build_pruned_encoder(tiny, EncoderSpec(sched, "brightness"))
    scores_for = bright.scorer.image_scores(tiny, None, None, sched.first_block)
    pixels = tiny_pixels[:2]
    scores = scores_for(pixels, [0, 1])
    assert scores.shape == (2, 64)
    with torch.no_grad():
        kept = bright(pixels, patch_scores=scores)
    assert kept.shape[0] == 2
    plain, _ = build_pruned_encoder(tiny, EncoderSpec(sched, "cls-attn"))
    assert plain.scorer.image_scores(tiny, None, None, sched.first_block) is None
