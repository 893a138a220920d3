"""Recipes: TOML files of option defaults. Precedence: explicit CLI flag > recipe > built-in default.

A recipe has one table per command (``[export]``, ``[build]``); keys are the commands' option
names in snake_case. Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prtool.errors import PrtoolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_recipe(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise PrtoolError(f"recipe {path} {what}: pass a .toml recipe file (recipes ship in export/recipes/)")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PrtoolError(f"recipe {path} is not valid TOML ({str(exc).splitlines()[0][:80]})") from None


def apply_recipe(recipe: Path | None, ctx, values: dict, section: str) -> dict:
    """Merge a recipe's ``[section]`` into ``values`` for every option not given on the command line."""
    out = {k: v for k, v in values.items() if k not in ("ctx",)}
    if recipe is None:
        return out
    table = read_recipe(recipe).get(section, {})
    unknown = sorted(set(table) - set(out))
    if unknown:
        raise PrtoolError(f"recipe {recipe} [{section}] has unknown keys {unknown}; known: {sorted(out)}")
    for key, value in table.items():
        # Compare by name: typer may bundle its own click, whose enum is a different class.
        source = ctx.get_parameter_source(key)
        if getattr(source, "name", None) != "COMMANDLINE":
            current = out[key]
            out[key] = Path(value) if isinstance(current, Path) else value
    return out
