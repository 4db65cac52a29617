"""Optimization recipes (`targets/*.yaml`): model + dataset + ordered passes + budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgeopt.errors import InputError
from edgeopt.profiles import Budgets
from edgeopt.yamlio import load_model_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field(description="registered model name or 'module:factory'")
    kwargs: dict[str, Any] = {}
    checkpoint: Path | None = None
    input_shape: list[int] = Field(min_length=1, description="one sample, batch excluded")


class DatasetSpec(_Strict):
    name: str
    kwargs: dict[str, Any] = {}


class Step(_Strict):
    """One pass: its registered name and its config."""

    name: str
    config: dict[str, Any] = {}


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="also the run directory's name")
    description: str = ""
    model: ModelSpec
    dataset: DatasetSpec
    passes: list[Step] = Field(min_length=1)
    budgets: dict[str, Budgets] = Field(default={}, description="per-profile overrides of the profile's budgets")
    profiles: list[str] | None = Field(None, description="profiles `edgeopt regress` runs this recipe for (default: all)")
    seed: int = 0

    @field_validator("passes", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """Accept `- lowrank: {rank_ratio: 0.5}` and `- export` as well as `{name:, config:}`."""
        if not isinstance(value, list):
            return value
        steps = []
        for item in value:
            if isinstance(item, str):
                steps.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, config), = item.items()
                steps.append({"name": name, "config": config or {}})
            else:
                steps.append(item)
        return steps


def load_recipe(path: Path) -> Recipe:
    recipe = load_model_yaml(Path(path), Recipe)
    recipe.budgets = _budgets_by_name(recipe.budgets, Path(path))
    if recipe.profiles:
        from edgeopt.errors import unknown_name
        from edgeopt.profiles import is_profile_path, profile_paths

        known = profile_paths()
        for profile in recipe.profiles:
            if not is_profile_path(profile) and profile not in known:
                raise InputError(f"{path}: profiles: {unknown_name('profile', profile, known)}")
    if recipe.model.checkpoint is not None and not recipe.model.checkpoint.is_absolute():
        # checkpoints are relative to the repository root (the recipe's parent's parent) or the CWD
        for base in (Path(path).resolve().parent.parent, Path.cwd()):
            if (base / recipe.model.checkpoint).exists():
                recipe.model.checkpoint = base / recipe.model.checkpoint
                break
    return recipe


def _budgets_by_name(budgets: dict[str, Budgets], recipe_path: Path) -> dict[str, Budgets]:
    """Budgets keyed by profile name. A key may be a profile file (one's own board, relative to
    the recipe or the current directory); it then applies under that profile's name."""
    from edgeopt.errors import unknown_name
    from edgeopt.profiles import is_profile_path, load_profile, profile_paths

    known, named = profile_paths(), {}
    for key, limits in budgets.items():
        if is_profile_path(key):
            beside = recipe_path.resolve().parent / key
            try:
                name = load_profile(str(beside) if beside.is_file() else key).name
            except InputError as exc:
                raise InputError(f"{recipe_path}: budgets: {exc}") from None
        elif key in known:
            name = key
        else:
            raise InputError(f"{recipe_path}: budgets: {unknown_name('profile', key, known)}")
        if name in named:
            raise InputError(f"{recipe_path}: budgets: profile '{name}' is given twice")
        named[name] = limits
    return named
