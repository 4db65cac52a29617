"""The pass architecture: a pass is a config (pydantic model) + the code that applies it.

Passes register by name in `PASSES`; third-party packages add theirs through the
`edgeopt.passes` entry-point group. A pass gets the previous step's artifact and
a `PassContext` and returns the new artifact, writing its files into
`ctx.step_dir`. It may record metrics in `ctx.metrics`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgeopt.artifact import ModelArtifact
from edgeopt.data import Splits
from edgeopt.errors import InputError
from edgeopt.profiles import Profile
from edgeopt.registry import Registry
from edgeopt.tasks import Task, task_for


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    splits: Splits
    profile: Profile
    step_dir: Path
    history: list[ModelArtifact]  # outputs of earlier steps; history[0] is the original model
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def original(self) -> ModelArtifact:
        return self.history[0]

    @property
    def task(self) -> Task:
        """The task of the recipe's data (its inputs, loss, metric): passes stay task-blind."""
        return task_for(self.splits)


class Pass(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    # False for passes whose output does not depend on the hardware profile: their
    # results are then shared between profiles by the step cache.
    uses_profile: ClassVar[bool] = True

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    @abstractmethod
    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact: ...


PASSES: Registry[type[Pass]] = Registry("pass", "edgeopt.passes")


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES.add(cls.name, cls)
    return cls


def make_pass(name: str, options: dict[str, Any] | None) -> Pass:
    _load_builtins()
    cls = PASSES.get(name)
    try:
        config = cls.Config(**(options or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(config)"
        raise InputError(f"pass '{name}': {where}: {err['msg']}") from None
    return cls(config)


_BUILTIN_MODULES = ["edgeopt.passes.lowrank", "edgeopt.passes.finetune", "edgeopt.passes.distill", "edgeopt.passes.quantize", "edgeopt.passes.export"]
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
