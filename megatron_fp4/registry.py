"""Load recipes by name (a YAML file shipped in `recipes/`) or by path, with knob overrides.

Validation is strict, because a silently ignored knob in a multi-day run is the worst outcome:
unknown keys, wrong types and values outside a knob's choices raise RecipeError naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from importlib import resources
from typing import Any, Mapping, Optional, Union

import yaml

from .recipe import FAMILIES, Recipe


class RecipeError(ValueError):
    """A recipe name, file or knob is invalid."""


def builtin_recipe_dir() -> str:
    return str(resources.files("megatron_fp4.recipes"))


def available_recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(builtin_recipe_dir()) if f.endswith(".yaml"))


def _allowed_types(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin is Union:
        return tuple(t for arg in typing.get_args(tp) for t in _allowed_types(arg))
    return (tp,)


def _coerce(key: str, value: Any, fld: dataclasses.Field, field_type, source: str):
    if field_type is tuple:   # a list of strings in YAML (e.g. bf16_modules patterns)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{source}: knob {key!r} must be a list of strings, got {value!r}")
        return tuple(value)
    types = _allowed_types(field_type)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise RecipeError(f"{source}: knob {key!r} must be {names}, got {value!r} "
                          f"({type(value).__name__})")
    choices = fld.metadata.get("choices")
    if choices is not None and not any(value == c and type(value) is type(c) or
                                       (isinstance(c, float) and isinstance(value, float) and abs(value - c) < 1e-12)
                                       for c in choices):
        raise RecipeError(f"{source}: knob {key!r} must be one of {list(choices)}, got {value!r}")
    return value


def build_recipe(data: Mapping[str, Any], source: str = "recipe", name: Optional[str] = None) -> Recipe:
    """Build and validate a recipe from a mapping with a `family` key and knobs."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a mapping of knobs, got {type(data).__name__}")
    data = dict(data)
    family = data.pop("family", None)
    if family is None:
        raise RecipeError(f"{source}: missing key 'family' (one of {sorted(FAMILIES)})")
    if family not in FAMILIES:
        raise RecipeError(f"{source}: unknown family {family!r} (one of {sorted(FAMILIES)})")
    cls = FAMILIES[family]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = sorted(k for k in fields)
            raise RecipeError(f"{source}: unknown knob {key!r} for family {family!r} (known: {known})")
        kwargs[key] = _coerce(key, value, fields[key], hints[key], source)
    if name is not None and "name" not in kwargs:
        kwargs["name"] = name
    recipe = cls(**kwargs)
    try:
        recipe.validate()
    except ValueError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


def load_recipe(name_or_path: Union[str, os.PathLike, Recipe], overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """A recipe by built-in name (`quartet2`, ...) or YAML path, with optional knob overrides."""
    if isinstance(name_or_path, Recipe):
        if not overrides:
            return name_or_path
        data = {f.name: getattr(name_or_path, f.name) for f in dataclasses.fields(name_or_path)}
        data["family"] = name_or_path.family
        data.update(overrides)
        return build_recipe(data, f"recipe {name_or_path.name!r} with overrides")
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = text
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file not found: {path}")
    else:
        path = os.path.join(builtin_recipe_dir(), f"{text}.yaml")
        if not os.path.isfile(path):
            raise RecipeError(f"unknown recipe {text!r}; built-in recipes: {available_recipes()} "
                              "(or pass a path to a YAML file)")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        raise RecipeError(f"{path}: empty recipe file")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: expected a mapping of knobs, got {type(data).__name__}")
    data = dict(data)
    if overrides:
        data.update(overrides)
    default_name = os.path.splitext(os.path.basename(path))[0]
    return build_recipe(data, path, name=default_name)
