"""Hardware profiles (`profiles/*.yaml`): what the board is, what it runs, its budgets.

Validated with pydantic; a bad file is a one-line error naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeopt.errors import InputError, unknown_name
from edgeopt.yamlio import load_model_yaml

Runtime = Literal["tflite", "onnxruntime", "tensorrt", "executorch"]
Precision = Literal["fp32", "fp16", "int8", "mixed"]

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CPU(_Strict):
    model: str
    cores: int = Field(gt=0)
    max_mhz: int | None = Field(default=None, gt=0)


class Accelerator(_Strict):
    kind: Literal["none", "ampere-gpu"] = "none"
    model: str | None = None
    tensor_cores: int | None = Field(default=None, ge=0)


class Budgets(_Strict):
    """Acceptance limits; a recipe may tighten them per profile. None = no limit."""

    max_latency_ms: float | None = Field(default=None, gt=0)
    max_accuracy_drop: float | None = Field(default=None, ge=0, description="points of top-1")
    max_model_size_mb: float | None = Field(default=None, gt=0)
    max_peak_memory_mb: float | None = Field(default=None, gt=0)

    def merged(self, override: Budgets | None) -> Budgets:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class Profile(_Strict):
    name: str
    description: str
    arch: Literal["aarch64", "x86_64"]
    cpu: CPU
    memory_mb: int = Field(gt=0)
    accelerator: Accelerator = Accelerator()
    runtimes: list[Runtime] = Field(min_length=1, description="in order of preference")
    default_precision: Precision = "fp32"
    threads: int = Field(gt=0)
    budgets: Budgets = Budgets()


def profile_paths(directory: Path = PROFILES_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def load_profile_file(path: Path) -> Profile:
    profile = load_model_yaml(Path(path), Profile)
    if profile.name != Path(path).stem:
        raise InputError(f"{path}: name '{profile.name}' does not match the file name '{Path(path).stem}'")
    return profile


def is_profile_path(name_or_path: str) -> bool:
    """A profile given as a YAML file (one's own board) rather than a name from `profiles/`."""
    return name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path


def load_profile(name_or_path: str, directory: Path = PROFILES_DIR) -> Profile:
    """A profile by name (from `profiles/`) or by path to a YAML file."""
    if is_profile_path(name_or_path):
        if not Path(name_or_path).expanduser().is_file():
            raise InputError(f"profile file not found: {name_or_path}")
        return load_profile_file(Path(name_or_path).expanduser())
    paths = profile_paths(directory)
    if name_or_path not in paths:
        raise unknown_name("profile", name_or_path, paths)
    return load_profile_file(paths[name_or_path])
