"""Benchmark suites (``benchmarks/suites/*.toml``): one dataclass per table, whose fields are its keys.

Unknown keys are errors (one line naming the table, the keys and the known ones), so a misspelt
``iter = 50`` cannot silently run the default. ``benchmarks/run_suite.py`` runs what :func:`read_suite` returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from prtool.errors import PrtoolError


@dataclass
class AccuracyRun:
    data: str
    methods: list[str]
    split: str = "test"
    limit: int | None = None
    schedules: list[str] = field(default_factory=list)
    keep_ratios: list[float] = field(default_factory=list)
    stages: int = 1
    first_block: int | None = None
    predictor: str | None = None
    rankings: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class SpeedRun:
    variants: list[str]
    backends: list[str]
    batch_sizes: list[int]
    schedule: str | None = None
    keep_ratio: float | None = None
    stages: int = 1
    first_block: int | None = None
    predictor: str | None = None
    warmup: int = 3
    iters: int = 20
    label: str | None = None  # names the run's result files when a suite has several


@dataclass
class Suite:
    name: str
    model: str
    pretrained: str | None = None
    accuracy: AccuracyRun | None = None
    speed: SpeedRun | None = None
    speed_runs: list[SpeedRun] = field(default_factory=list)

    @property
    def all_speed_runs(self) -> list[SpeedRun]:
        return ([self.speed] if self.speed else []) + self.speed_runs


def _table(cls, table, where: str):
    """``cls`` from a TOML table, refusing unknown and missing keys."""
    if not isinstance(table, dict):
        raise PrtoolError(f"{where} must be a table of keys")
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PrtoolError(f"{where} has unknown keys {unknown}; known: {sorted(known)}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in table]
    if missing:
        raise PrtoolError(f"{where} lacks the keys {missing}")
    return cls(**table)


def read_suite(path: Path) -> Suite:
    """The suite in the TOML file ``path``, checked key by key."""
    from prtool.util.recipes import tomllib

    path = Path(path)
    if not path.is_file():
        raise PrtoolError(f"suite {path} does not exist: pass a .toml file such as benchmarks/suites/testbed.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PrtoolError(f"suite {path} is not valid TOML ({str(exc).splitlines()[0][:80]})") from None
    top = {k: v for k, v in raw.items() if k not in ("accuracy", "speed", "speed_runs")}
    suite = _table(Suite, top, f"suite {path}")
    if "accuracy" in raw:
        suite.accuracy = _table(AccuracyRun, raw["accuracy"], f"suite {path} [accuracy]")
    if "speed" in raw:
        suite.speed = _table(SpeedRun, raw["speed"], f"suite {path} [speed]")
    runs = raw.get("speed_runs", [])
    suite.speed_runs = [_table(SpeedRun, r, f"suite {path} [[speed_runs]] #{i + 1}") for i, r in enumerate(runs)]
    return suite
