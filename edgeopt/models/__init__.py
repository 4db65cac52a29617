"""Model registry: built-in names or `module:factory`, plus checkpoint loading.

A factory is a callable returning an `nn.Module`; the recipe's `model.kwargs`
are passed to it. Checkpoints are safetensors (or `.pt` state dicts, read with
`weights_only=True`) and must match the model exactly (`strict=True`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeopt.errors import InputError
from edgeopt.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "edgeopt.models")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    return MODELS.register(name)


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """A registered name, or `package.module:callable` for user models."""
    if ":" in name:
        from edgeopt.registry import import_callable

        return import_callable(name, "model")
    _load_builtins()
    return MODELS.get(name)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} does not hold a state dict")
    return state


def load_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    """Load `path` into `model` strictly; a mismatch is a one-line InputError."""
    state = load_state_dict(path)
    convert = getattr(model, "convert_state_dict", None)  # e.g. VMamba's first-release key names
    if convert is not None:
        state = convert(state)
    missing, unexpected, wrong = _compare(model.state_dict(), state)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        raise InputError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def _compare(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, wrong


def build_model(name: str, kwargs: dict[str, Any] | None = None, checkpoint: Path | None = None) -> nn.Module:
    factory = resolve_factory(name)
    try:
        model = factory(**(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"model '{name}' rejected its arguments: {exc}") from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def check_input_shape(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> None:
    """One forward pass on a zero batch of `input_shape`, so a wrong shape is named here in one
    line rather than by the exporter (which blames an unsupported op after pages of log)."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((2, *input_shape)))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"model.input_shape {list(input_shape)} (one sample, batch excluded) does not fit the model: {reason}"
        ) from None


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Import the built-in model families so they register themselves."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


# Each built-in model family lives in its own module and registers on import.
_BUILTIN_MODULES = ["edgeopt.models.mlp", "edgeopt.models.vmamba", "edgeopt.models.moe",
                    "edgeopt.models.fusion_det"]
