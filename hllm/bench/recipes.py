"""The benchmark recipes of `configs/bench/`, the one home of every setting behind a published number.

- `NAME.yaml`: the run config of model NAME, an ordinary config file (`hllm train` reads it too;
  the config loader rejects unknown keys as for any other); the dataset, name, seed and output
  folder are the harness's.
- `grids/*.yaml`: a validation grid, `recipes:` (the models it tunes) and `settings:` (lists of
  overrides on top of the recipe, `[]` the recipe itself). A model in no grid is not tuned.
- `datasets.yaml`: each standard dataset's path (relative to the repository) and text fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hllm.errors import UserError

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "configs" / "bench"

T = TypeVar("T")


@dataclass
class Grid:
    recipes: list[str]
    """Models (recipe names) this grid tunes."""
    settings: list[list[str]]
    """Each setting: `a.b=value` overrides on top of the recipe; `[]` is the recipe itself."""


@dataclass
class BenchDataset:
    path: str
    """Dataset folder, relative to the repository root."""
    text_fields: list[str] = field(default_factory=list)
    """Item fields that make the item text (empty: every text column)."""

    @property
    def folder(self) -> Path:
        return (REPO / self.path).resolve()


def model_names() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.yaml") if path.stem != "datasets")


def recipe_path(model: str) -> Path:
    """`configs/bench/MODEL.yaml`, or a UserError listing the models there are."""
    path = RECIPES / f"{model}.yaml"
    if model not in model_names():
        raise UserError(f"unknown model {model!r}: use {', '.join(model_names())}", where="--models")
    return path


def grid_of(model: str) -> list[list[str]] | None:
    """The settings `model` is tuned over, or None for a model no grid lists."""
    return next((grid.settings for grid in grids().values() if model in grid.recipes), None)


@cache
def grids() -> dict[str, Grid]:
    """Every grid of `configs/bench/grids/`, by file name; a model listed twice is an error."""
    found = {path.stem: _read(path, Grid) for path in sorted((RECIPES / "grids").glob("*.yaml"))}
    listed = [model for grid in found.values() for model in grid.recipes]
    if twice := sorted({model for model in listed if listed.count(model) > 1}):
        raise UserError(f"models in more than one grid: {', '.join(twice)}", where=str(RECIPES / "grids"))
    return found


@cache
def datasets() -> dict[str, BenchDataset]:
    path = RECIPES / "datasets.yaml"
    return {name: _read(path, BenchDataset, entry, name) for name, entry in _yaml(path).items()}


def _read(path: Path, schema: type[T], entry: object = None, key: str = "") -> T:
    """`entry` (default: the whole file) checked against the dataclass `schema`, unknown keys refused."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), _yaml(path) if entry is None else entry)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        where = ".".join(filter(None, [key, getattr(err, "full_key", "")]))
        raise UserError(str(err).splitlines()[0], where=f"{path}: {where}" if where else str(path)) from None


def _yaml(path: Path) -> dict:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise UserError("expected a mapping of keys", where=str(path))
    return loaded
