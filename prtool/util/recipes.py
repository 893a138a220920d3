"""Recipes: TOML files of option defaults. Precedence: explicit CLI flag > recipe > built-in default.

A recipe has one table per command (``[export]``, ``[build]``). Each command's options are one
dataclass (``prtool.export.request.ExportRequest``, ``prtool.deploy.build_request.BuildRequest``)
whose fields are the schema: a recipe key is a field name, the CLI fills the dataclass from its
flags and the recipe (:func:`options_from`) and hands it to one library call. Unknown keys are
errors, so a typo, or a key no code reads, never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from prtool.errors import PrtoolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NOT_IN_RECIPES = {"recipe": False}  # field metadata: a positional argument, given on the command line only


def read_recipe(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise PrtoolError(f"recipe {path} {what}: pass a .toml recipe file (recipes ship in export/recipes/)")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PrtoolError(f"recipe {path} is not valid TOML ({str(exc).splitlines()[0][:80]})") from None


def recipe_keys(cls) -> list[str]:
    """The keys a recipe may set for the options dataclass ``cls``: its fields, less the positional ones."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("recipe", True)]


def _coerce(recipe: Path, section: str, field: dataclasses.Field, value):
    """A recipe value as the field holds it (paths as ``Path``), refusing a value of the wrong kind."""
    kind = type(field.default) if field.default not in (None, dataclasses.MISSING) else None
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(kind)
    wrong_bool = isinstance(value, bool) and kind in (int, float)  # TOML's true is no number here
    if accepted is not None and (not isinstance(value, accepted) or wrong_bool):
        raise PrtoolError(f"recipe {recipe} [{section}] {field.name} = {value!r} must be of type {kind.__name__}")
    if "Path" in str(field.type) and isinstance(value, str):
        return Path(value)
    return value


def options_from(cls, ctx, params: dict, recipe: Path | None, section: str):
    """The options dataclass ``cls`` filled from a command's parameters (``params``: its ``locals()``),
    with the recipe's ``[section]`` for every option not given on the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {name: params[name] for name in fields}
    if recipe is None:
        return cls(**values)
    table = read_recipe(recipe).get(section, {})
    if not isinstance(table, dict):
        raise PrtoolError(f"recipe {recipe}: [{section}] must be a table of options")
    known = recipe_keys(cls)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PrtoolError(f"recipe {recipe} [{section}] has unknown keys {unknown}; known: {sorted(known)}")
    for key, value in table.items():
        # Compare by name: typer may bundle its own click, whose enum is a different class.
        source = ctx.get_parameter_source(key)
        if getattr(source, "name", None) != "COMMANDLINE":
            values[key] = _coerce(recipe, section, fields[key], value)
    return cls(**values)
