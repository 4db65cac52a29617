"""ModelArtifact: what flows between pipeline steps.

A PyTorch artifact is stored without pickle: the base model (factory name +
kwargs), the ordered list of structural *edits* earlier passes made (e.g. which
layers were factorized at which rank) and the weights as safetensors. Loading
rebuilds the base model, replays the edits on it, then loads the weights
strictly. Exported artifacts (onnx, tflite, tensorrt) are just their file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeopt.registry import Registry

# An edit reapplies a structural change to a freshly built model: edit(model, params).
EDITS: Registry[Callable[[nn.Module, dict[str, Any]], None]] = Registry("model edit", "edgeopt.edits")

TORCH = "torch"


@dataclass(frozen=True)
class ModelSource:
    """How to build the base model: registered name or `module:factory`, and kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelArtifact:
    format: str  # "torch" | "onnx" | "tflite" | "tensorrt" | plugin formats
    path: Path  # weights.safetensors for torch, the model file otherwise
    source: ModelSource
    input_shape: tuple[int, ...]  # one sample's input shape, batch excluded
    edits: list[dict[str, Any]] = field(default_factory=list)
    precision: str = "fp32"
    meta: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = field(default=None, repr=False, compare=False)  # in-memory cache

    # -- torch artifacts -------------------------------------------------
    def load_module(self) -> nn.Module:
        """The PyTorch model (cached); only for torch artifacts."""
        if self.format != TORCH:
            raise ValueError(f"a {self.format} artifact has no PyTorch module")
        if self.module is None:
            from safetensors.torch import load_file

            model = build_structure(self.source, self.edits)
            model.load_state_dict(load_file(str(self.path)), strict=True)
            self.module = model.eval()
        return self.module

    def with_module(self, module: nn.Module, path: Path, edits: list[dict[str, Any]] | None = None) -> ModelArtifact:
        """A new torch artifact for `module`, saved atomically to `path`."""
        save_weights(module, path)
        return replace(
            self, format=TORCH, path=Path(path), module=module.eval(), edits=list(self.edits if edits is None else edits)
        )

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros((batch, *self.input_shape))

    # -- (de)serialization for manifests ---------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "source": {"name": self.source.name, "kwargs": self.source.kwargs},
            "input_shape": list(self.input_shape),
            "edits": self.edits,
            "precision": self.precision,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelArtifact:
        return cls(
            format=data["format"],
            path=Path(data["path"]),
            source=ModelSource(data["source"]["name"], dict(data["source"]["kwargs"])),
            input_shape=tuple(data["input_shape"]),
            edits=list(data["edits"]),
            precision=data.get("precision", "fp32"),
            meta=dict(data.get("meta", {})),
        )


def build_structure(source: ModelSource, edits: list[dict[str, Any]]) -> nn.Module:
    """The base model with every structural edit replayed (weights not loaded)."""
    from edgeopt.models import resolve_factory

    model = resolve_factory(source.name)(**source.kwargs)
    for edit in edits:
        EDITS.get(edit["edit"])(model, edit)
    return model


def save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    from edgeopt.fileio import write_with

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    write_with(Path(path), lambda tmp: save_file(state, str(tmp)))
