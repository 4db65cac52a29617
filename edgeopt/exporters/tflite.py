"""PyTorch → TFLite through litert-torch (no TensorFlow install needed).

TFLite wants a static batch dimension; we export batch 1, which is how an
edge app calls it and how benchmark_model times it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import torch
from torch import nn

from edgeopt.exporters import EXPORTERS, ExportError
from edgeopt.exporters.onnx import describe_export_failure
from edgeopt.fileio import write_with


@EXPORTERS.register("tflite")
def export_tflite(model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import litert_torch

    model = model.eval()
    sample = example_input[:1]

    def write(tmp: Path) -> None:
        try:
            with _quiet():
                litert_torch.convert(model, (sample,)).export(str(tmp))
        except Exception as exc:
            raise ExportError(describe_export_failure("TFLite", model, sample, exc)) from exc

    return write_with(Path(path), write)


@contextlib.contextmanager
def _quiet():
    for name in ("litert_torch", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield
