"""Every command and subcommand through the real entry point, in table mode and with ``--json``, on the
tiny model (so a printing bug cannot hide behind ``--json``); then every path argument of every
command fed the wrong kind of file: one line on stderr, exit 1, nothing on stdout, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_artifacts import TINY, artifacts, run  # noqa: F401 - artifacts is a fixture

S = ("-s", "1:16")


def _commands():
    """``(name, args(artifacts, out_dir))`` for every command; ``out_dir`` is a fresh folder."""
    return [
        ("env", lambda a, o: ["env"]),
        ("export", lambda a, o: ["export", *TINY, *S, "--predictor", a.predictor, "-o", o / "m.onnx"]),
        ("export", lambda a, o: ["export", *TINY, *S, "--predictor", a.predictor, "--quantize", "int8-dynamic",
                                 "-o", o / "q.onnx"]),
        ("inspect", lambda a, o: ["inspect", a.onnx]),
        ("rank", lambda a, o: ["rank", *TINY, "-d", "testbed", "--split", "test", "--limit", "2", "--stride", "2",
                               "-o", o / "rk"]),
        ("train", lambda a, o: ["train", "-r", a.rankings, *TINY, "-d", "testbed", "--split", "test", "--epochs", "1",
                                "-o", o / "p.safetensors"]),
        ("eval", lambda a, o: ["eval", *TINY, "-d", "testbed", "--limit", "8", *S, "--predictor", a.predictor]),
        ("show", lambda a, o: ["show", *TINY, "-d", "testbed", "-n", "2", *S, "--predictor", a.predictor,
                               "-o", o / "s.png"]),
        ("tune", lambda a, o: ["tune", *TINY, "-d", "testbed", "--shots", "1", "--epochs", "1", *S, "--predictor",
                               a.predictor, "--limit", "4", "-o", o / "t.safetensors"]),
        ("export-text", lambda a, o: ["export-text", *TINY, "--tokens", a.tokens, "-o", o / "text.onnx"]),
        ("build", lambda a, o: ["build", a.onnx, "--dry-run", "-o", o / "m.plan"]),
        ("validate", lambda a, o: ["validate", a.onnx, "-b", "2"]),
        ("package", lambda a, o: ["package", "--triton", o / "triton", a.onnx]),
        ("demo", lambda a, o: ["demo", "--limit", "4", "--latency-batch", "2", "--latency-iters", "1", "-o", o / "d"]),
        ("testbed data", lambda a, o: ["testbed", "data", "--idx-dir", a.idx, "--limit", "3", "-o", o / "td"]),
        ("testbed train", lambda a, o: ["testbed", "train", "--idx-dir", a.idx, "--samples", "8", "--batch-size", "8",
                                        "--no-evaluate", "-o", o / "tb.safetensors"]),
        ("bench accuracy", lambda a, o: ["bench", "accuracy", *TINY, "-d", "testbed", "--limit", "4", *S, "--methods",
                                         "none,patch-ranking,random", "--seeds", "0", "--predictor", a.predictor,
                                         "-o", o / "ba"]),
        ("bench speed", lambda a, o: ["bench", "speed", *TINY, *S, "--variants", "baseline,patch-ranking",
                                      "--batch-sizes", "2", "--warmup", "1", "--iters", "2", "-o", o / "bs"]),
        ("bench pareto", lambda a, o: ["bench", "pareto", *TINY, "-d", "testbed", "--limit", "4", "--budgets", "1x50%",
                                       "--methods", "none,patch-ranking,patch-ranking-merge", "--predictor",
                                       a.predictor, "--batch", "2", "--warmup", "1", "--iters", "1", "-o", o / "bp"]),
        ("bench prompts", lambda a, o: ["bench", "prompts", *TINY, "-d", "testbed", "--shots", "1", "--epochs", "1",
                                        "--limit", "4", *S, "--scorer", "cls-attn", "--n-ctx", "1", "-o", o / "bp"]),
        ("tune-avit", lambda a, o: ["tune-avit", *TINY, "--split", "test", "--images", "8", "--calib-images", "4",
                                    "-s", "1:16", "-o", o / "a.safetensors"]),  # A-ViT (#23)
        ("avit-tokens", lambda a, o: ["avit-tokens", "--limit", "2"]),  # the testbed's shipped A-ViT weights
        ("plan", lambda a, o: ["plan", *TINY, "-d", "testbed", "--speedup", "1.01", "--methods", "evit",
                               "--stages", "1", "--keep-ratios", "0.3", "--safety", "0", "--calib-limit", "4",
                               "--batch", "16", "--warmup", "1", "--iters", "3", "-o", o / "pl"]),
    ]


COMMANDS = _commands()


def test_the_matrix_names_every_command():
    from prtool.cli.app import app

    def names(typer_app, prefix=""):
        out = {prefix + (c.name or c.callback.__name__) for c in typer_app.registered_commands}
        for g in typer_app.registered_groups:
            out |= names(g.typer_instance, prefix + g.name + " ")
        return out

    assert names(app) == {name for name, _ in COMMANDS}


@pytest.mark.parametrize("mode", ["table", "json"])
@pytest.mark.parametrize("name, args", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_command_prints_in_both_modes(artifacts, tmp_path, name, args, mode):  # noqa: F811
    if (name, mode) == ("demo", "json"):
        pytest.skip("tests/test_demo.py runs `prtool demo --json` (the demo is the slowest command)")
    argv = args(artifacts, tmp_path) + (["--json"] if mode == "json" else [])
    code, out, err = run(*argv)
    assert code == 0, f"prtool {name} ({mode}) exited {code}: {err[-2000:]}"
    assert "Traceback" not in err, err
    assert out.strip(), f"prtool {name} ({mode}) printed nothing on stdout"
    if mode == "json":
        assert isinstance(json.loads(out), dict)
    else:
        with pytest.raises(ValueError):
            json.loads(out)


def test_version(capsys):
    from importlib.metadata import version

    code, out, err = run("--version")
    assert code == 0 and out.strip() == f"prtool {__import__('prtool').__version__}" and not err
    assert version("prtool")  # the installed distribution, the same source


# ---- every path argument x the wrong kind of file ---------------------------------------------------

KINDS = ("onnx", "safetensors", "text", "directory", "missing")


@pytest.fixture
def kinds(tmp_path_factory, artifacts):  # noqa: F811
    """One file of each wrong kind, each alone in its folder (no manifest or config beside it), fresh per case."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("kinds")
    out = {k: root / k for k in KINDS}
    for k in KINDS:
        out[k].mkdir()
    paths = {"onnx": out["onnx"] / "graph.onnx", "safetensors": out["safetensors"] / "weights.safetensors",
             "text": out["text"] / "notes.txt", "directory": out["directory"] / "folder",
             "missing": out["missing"] / "gone.safetensors"}
    shutil.copy(artifacts.onnx, paths["onnx"])
    save_file({"w": torch.zeros(3)}, str(paths["safetensors"]))
    paths["text"].write_text("hello, not a model\n")
    paths["directory"].mkdir()
    return paths


# (command, option or None for the positional, base args(artifacts, out), kinds that are this argument's
# right kind (not errors), whether the argument is an output)
PATH_ARGS = [
    ("export", "-p", lambda a, o: ["export", "-m", "prtool-tiny", *S, "--scorer", "cls-attn", "-o", o / "m.onnx"], ()),
    ("export", "--predictor", lambda a, o: ["export", *TINY, *S, "-o", o / "m.onnx"], ()),
    ("export", "--tokens", lambda a, o: ["export", *TINY, *S, "--predictor", a.predictor, "-o", o / "m.onnx"], ()),
    ("export", "--images", lambda a, o: ["export", *TINY, "--no-prune", "-o", o / "m.onnx"], ()),
    ("export", "--recipe", lambda a, o: ["export", *TINY, "--no-prune", "-o", o / "m.onnx"], ()),
    ("export", "-o", lambda a, o: ["export", *TINY, "--no-prune"], ("missing", "onnx")),
    ("export", "--calib-data", lambda a, o: ["export", *TINY, "--no-prune", "--quantize", "int8-qdq",
                                             "-o", o / "m.onnx"], ()),
    ("inspect", None, lambda a, o: ["inspect"], ("onnx",)),
    ("rank", "-d", lambda a, o: ["rank", *TINY, "--limit", "2", "-o", o / "rk"], ()),
    ("rank", "-o", lambda a, o: ["rank", *TINY, "-d", "testbed", "--limit", "2"], ("missing", "directory")),
    ("train", "-r", lambda a, o: ["train", *TINY, "-d", "testbed", "--split", "test", "-o", o / "p.safetensors"], ()),
    ("train", "-d", lambda a, o: ["train", "-r", a.rankings, *TINY, "--split", "test", "-o", o / "p.safetensors"], ()),
    ("train", "-o", lambda a, o: ["train", "-r", a.rankings, *TINY, "-d", "testbed", "--split", "test"],
     ("missing", "safetensors")),
    ("eval", "-p", lambda a, o: ["eval", "-m", "prtool-tiny", "--limit", "2"], ()),
    ("eval", "-d", lambda a, o: ["eval", *TINY, "--limit", "2"], ()),
    ("eval", "--predictor", lambda a, o: ["eval", *TINY, "--limit", "2", *S], ()),
    ("eval", "--rankings", lambda a, o: ["eval", *TINY, "--limit", "2", *S, "--scorer", "golden"], ()),
    ("eval", "--onnx", lambda a, o: ["eval", *TINY, "--limit", "2"], ("onnx",)),
    ("eval", "--templates", lambda a, o: ["eval", *TINY, "--limit", "2"], ()),
    ("show", "-d", lambda a, o: ["show", *TINY, *S, "-o", o / "s.png"], ()),
    ("show", "--predictor", lambda a, o: ["show", *TINY, "-d", "testbed", *S, "-o", o / "s.png"], ()),
    ("show", "-r", lambda a, o: ["show", *TINY, "-d", "testbed", *S, "-o", o / "s.png"], ()),
    ("show", "-o", lambda a, o: ["show", *TINY, "-d", "testbed", *S], ("missing",)),
    ("tune", "-d", lambda a, o: ["tune", *TINY, "--shots", "1", "--epochs", "1", *S, "--scorer", "cls-attn",
                                 "-o", o / "t.safetensors"], ()),
    ("tune", "--predictor", lambda a, o: ["tune", *TINY, "-d", "testbed", "--shots", "1", *S,
                                          "-o", o / "t.safetensors"], ()),
    ("tune", "-o", lambda a, o: ["tune", *TINY, "-d", "testbed", "--shots", "1", "--epochs", "1", *S, "--scorer",
                                 "cls-attn"], ("missing", "safetensors")),
    ("export-text", "--tokens", lambda a, o: ["export-text", *TINY, "-o", o / "text.onnx"], ()),
    ("export-text", "-o", lambda a, o: ["export-text", *TINY], ("missing", "onnx")),
    ("build", None, lambda a, o: ["build", "--dry-run", "-o", o / "m.plan"], ("onnx",)),
    ("build", "--recipe", lambda a, o: ["build", a.onnx, "--dry-run", "-o", o / "m.plan"], ()),
    ("validate", None, lambda a, o: ["validate"], ()),
    ("validate", "--predictor", lambda a, o: ["validate", a.onnx], ()),
    ("validate", "-p", lambda a, o: ["validate", a.onnx], ()),
    ("validate", "--images", lambda a, o: ["validate", a.onnx], ()),
    ("package", None, lambda a, o: ["package", "--triton", o / "tri"], ()),
    ("package", "--triton", lambda a, o: ["package", a.onnx], ("missing", "directory")),
    ("bench accuracy", "-d", lambda a, o: ["bench", "accuracy", *TINY, *S, "--limit", "2", "-o", o / "ba"], ()),
    ("bench accuracy", "--predictor", lambda a, o: ["bench", "accuracy", *TINY, "-d", "testbed", *S, "--limit", "2",
                                                    "-o", o / "ba"], ()),
    ("bench accuracy", "-o", lambda a, o: ["bench", "accuracy", *TINY, *S, "--limit", "2"], ("missing", "directory")),
    ("bench speed", "--predictor", lambda a, o: ["bench", "speed", *TINY, *S, "-o", o / "bs"], ()),
    ("bench speed", "-o", lambda a, o: ["bench", "speed", *TINY, *S], ("missing", "directory")),
    ("bench pareto", "-d", lambda a, o: ["bench", "pareto", *TINY, "--budgets", "1x50%", "-o", o / "bp"], ()),
    ("bench pareto", "--predictor", lambda a, o: ["bench", "pareto", *TINY, "-d", "testbed", "--budgets", "1x50%",
                                                  "-o", o / "bp"], ()),
    ("bench pareto", "--combine", lambda a, o: ["bench", "pareto", "-o", o / "bp"], ()),
    ("bench pareto", "-o", lambda a, o: ["bench", "pareto", *TINY, "--budgets", "1x50%"], ("missing", "directory")),
    ("bench prompts", "-d", lambda a, o: ["bench", "prompts", *TINY, *S, "-o", o / "bp"], ()),
    ("bench prompts", "-o", lambda a, o: ["bench", "prompts", *TINY, *S], ("missing", "directory")),
    ("testbed data", "--idx-dir", lambda a, o: ["testbed", "data", "--limit", "2", "-o", o / "td"], ()),
    ("testbed data", "-o", lambda a, o: ["testbed", "data", "--idx-dir", a.idx, "--limit", "2"],
     ("missing", "directory")),
    ("testbed train", "--idx-dir", lambda a, o: ["testbed", "train", "--samples", "8", "-o", o / "t.safetensors"], ()),
    ("testbed train", "-o", lambda a, o: ["testbed", "train", "--idx-dir", a.idx, "--samples", "8"],
     ("missing", "safetensors")),
    ("demo", "-o", lambda a, o: ["demo", "--limit", "2"], ("missing", "directory")),
    ("tune-avit", "-o", lambda a, o: ["tune-avit", *TINY, "--images", "8", "-s", "1:16"], ("missing", "safetensors")),
    ("avit-tokens", "--weights", lambda a, o: ["avit-tokens", "--limit", "2"], ()),
    ("plan", "--predictor", lambda a, o: ["plan", *TINY, "--speedup", "1.2", "-o", o / "pl"], ()),
    ("plan", "--cache", lambda a, o: ["plan", *TINY, "--speedup", "1.2", "-o", o / "pl"], ("missing",)),
    ("plan", "-o", lambda a, o: ["plan", *TINY, "--speedup", "1.2"], ("missing", "directory")),
]
CASES = [(cmd, opt, base, kind) for cmd, opt, base, ok in PATH_ARGS for kind in KINDS if kind not in ok]


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("cmd, opt, base, kind", CASES, ids=[f"{c} {o or 'PATH'} {k}" for c, o, _, k in CASES])
def test_wrong_kind_of_file(artifacts, kinds, tmp_path, cmd, opt, base, kind):  # noqa: F811
    bad = kinds[kind]
    out = tmp_path / "out"
    argv = base(artifacts, out)
    argv = argv + ([opt, bad] if opt else [bad])
    before = {k: _tree(p.parent) for k, p in kinds.items()}
    code, stdout, err = run(*argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, f"exit {code}: {err[-1500:]}"
    assert stdout == "", stdout
    assert len(lines) == 1 and lines[0].startswith("prtool: error: "), err[-1500:]
    assert bad.name in lines[0], lines[0]  # the message names the file it refuses
    assert not out.exists() or _tree(out) == [], _tree(out)
    assert {k: _tree(p.parent) for k, p in kinds.items()} == before
