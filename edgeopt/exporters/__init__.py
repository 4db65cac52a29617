"""Exporters: PyTorch module → deployable file, registered by format name.

An exporter is `export(model, example_input, path) -> Path`; it writes
atomically and raises `ExportError` (one line, names the op) when the format
cannot express the model. Plugins add formats via `edgeopt.exporters`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgeopt.errors import InputError
from edgeopt.registry import Registry

Exporter = Callable[[nn.Module, torch.Tensor, Path], Path]

EXPORTERS: Registry[Exporter] = Registry("exporter", "edgeopt.exporters")

# file suffix and the runtime that executes each built-in format
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tensorrt": ".engine", "pte": ".pte"}
RUNTIME_FORMAT = {"onnxruntime": "onnx", "tflite": "tflite", "tensorrt": "tensorrt", "executorch": "pte"}
FORMAT_RUNTIME = {v: k for k, v in RUNTIME_FORMAT.items()}


class ExportError(InputError):
    """The target format cannot express (part of) the model."""


def export(fmt: str, model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    _load_builtins()
    return EXPORTERS.get(fmt)(model, example_input, Path(path))


def _load_builtins() -> None:
    from edgeopt.exporters import onnx as _onnx  # noqa: F401
    from edgeopt.exporters import pte as _pte  # noqa: F401
    from edgeopt.exporters import tflite as _tflite  # noqa: F401
