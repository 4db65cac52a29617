"""PyTorch → TFLite through litert-torch (no TensorFlow install needed).

TFLite wants a static batch dimension; we export batch 1, which is how an
edge app calls it and how benchmark_model times it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
from torch import nn

from edgeopt.console import third_party_quiet
from edgeopt.exporters import EXPORTERS, ExportError
from edgeopt.exporters.onnx import describe_export_failure
from edgeopt.fileio import write_with


@EXPORTERS.register("tflite")
def export_tflite(model: nn.Module, example_input: torch.Tensor, path: Path, keep_metadata: bool = False) -> Path:
    """`keep_metadata` keeps litert-torch's tensor names (module stacks), which ai-edge-quantizer's
    recipes match; a deployable file drops them (`strip_tensor_names`)."""
    with third_party_quiet():
        import litert_torch

    model = model.eval()
    sample = example_input[:1]

    def write(tmp: Path) -> None:
        try:
            with _quiet(), third_party_quiet():
                litert_torch.convert(model, (sample,)).export(str(tmp))
        except Exception as exc:
            raise ExportError(describe_export_failure("TFLite", model, sample, exc)) from exc
        if not keep_metadata:
            strip_tensor_names(tmp)

    return write_with(Path(path), write)


def strip_tensor_names(path: Path) -> None:
    """Drop the names of intermediate and constant tensors in place, with LiteRT's own flatbuffer
    tools (as its `strip_strings`, but the input/output names and signatures stay, so callers
    still find the model's input). litert-torch names every tensor by its module stack, ~150
    bytes each: 18% of digits-vmamba's fp32 file and 35% of its int8 one."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    model.description = None
    for subgraph in model.subgraphs:
        named = {*subgraph.inputs, *subgraph.outputs}
        for index, tensor in enumerate(subgraph.tensors):
            if index not in named:
                tensor.name = None
    flatbuffer_utils.write_model(model, str(path))


@contextlib.contextmanager
def _quiet():
    for name in ("litert_torch", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield
