"""PyTorch → ONNX through torch.onnx's dynamo exporter, with a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from edgeopt.exporters import EXPORTERS, ExportError
from edgeopt.fileio import write_with

OPSET = 18


@EXPORTERS.register("onnx")
def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, keep_metadata: bool = False) -> Path:
    """`keep_metadata` keeps the exporter's per-node debug records (module scopes, stack
    traces), which the quantizer reads; a deployable file drops them (about half its bytes)."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)

    def write(tmp: Path) -> None:
        try:
            with quiet():
                program = torch.onnx.export(
                    model,
                    (example_input,),
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_shapes=({0: batch},),
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=False,
                )
                program.save(str(tmp))
            if not keep_metadata:
                strip_debug_metadata(tmp)
        except Exception as exc:
            raise ExportError(describe_export_failure("ONNX", model, example_input, exc)) from exc

    return write_with(Path(path), write)


def strip_debug_metadata(path: Path) -> None:
    """Drop per-node and per-value metadata in place; the graph and weights are unchanged."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    for value in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output, *proto.graph.initializer]:
        del value.metadata_props[:]
    onnx.save(proto, str(path))


@contextlib.contextmanager
def quiet():
    """torch.onnx prints progress lines to stdout; keep the CLI's output ours."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def describe_export_failure(fmt: str, model: nn.Module, example_input: torch.Tensor, exc: Exception) -> str:
    """One line naming the op and the module that holds it, and a way out."""
    from edgeopt.quantize.op_location import with_module

    text = " ".join(_ANSI.sub("", str(exc)).split())
    op = re.search(r"((?:aten|prims)[.:][\w.]+|torch\.ops\.[\w.]+)", text)
    what = f"op {op.group(1)}" if op else "the model"
    message = (
        f"{fmt} export failed: {what} is not supported ({text[:240]}); "
        "try another format, or keep that module in float / rewrite it"
    )
    return with_module(message, model, example_input)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
