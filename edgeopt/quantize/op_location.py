"""Which PyTorch module holds the op an exporter or a runtime rejected.

Exporters name the failing aten op ("Lowering not found: aten.erfinv.default",
"No ONNX function found for aten.linalg_inv_ex") but not where it sits in the
model; `torch.export` records the module stack of every node, so we look it up.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

_OP = re.compile(r"(?:aten|prims)\.(\w+)")


def op_module(model: nn.Module, example_input: torch.Tensor, message: str) -> tuple[str, str] | None:
    """(op as named in `message`, module path) for the first aten/prims op named there, or None."""
    match = _OP.search(message)
    if match is None:
        return None
    op = match.group(1)
    try:
        program = torch.export.export(model.eval(), (example_input,))
    except Exception:
        return None
    for graph in (program.graph, program.run_decompositions().graph):
        for node in graph.nodes:
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if node.op == "call_function" and _same_op(name, op):
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                path, cls = stack[-1] if stack else ("", type(model).__name__)
                return match.group(0), f"{path or '<root>'} ({str(cls).rsplit('.', 1)[-1]})"
    return None


def _same_op(graph_name: str, reported: str) -> bool:
    """aten.linalg_inv vs reported linalg_inv_ex, aten.erfinv vs prims.erf_inv."""
    return reported.replace("_", "") == graph_name.replace("_", "") or reported.startswith(graph_name + "_")


def with_module(message: str, model: nn.Module, example_input: torch.Tensor) -> str:
    """`message` with "in module 'path' (Class)" after the op name, when the op can be placed."""
    found = op_module(model, example_input, message)
    if found is None or " in module " in message:
        return message
    op, where = found
    return re.sub(rf"{re.escape(op)}[\w.]*", lambda m: f"{m.group(0)} in module '{where}'", message, count=1)


def runtime_rejection(fmt: str, path: Path, exc: Exception, modules: list[str]) -> str:
    """One line for a quantized file its runtime refuses to load: the op, its module and a way out."""
    text = " ".join(str(exc).split())
    op = node = module = None
    if fmt == "tflite":
        found = re.search(r"Node number (\d+) \((\w+)\)", text)
        if found:
            from ai_edge_litert.interpreter import Interpreter

            from edgeopt.quantize.tflite_quant import tensor_module

            interpreter = Interpreter(model_path=str(path))
            names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
            details = interpreter._get_ops_details()[int(found.group(1))]
            op, node = found.group(2), found.group(1)
            module = next(filter(None, (tensor_module(names[t], modules) for t in details["outputs"])), None)
    else:
        found = re.search(r"node (?:with name )?'?([\w./:-]+)'?", text, re.IGNORECASE)
        if found:
            import onnx

            from edgeopt.quantize.onnx_quant import node_modules

            model = onnx.load(str(path))
            node = found.group(1)
            op = next((n.op_type for n in model.graph.node if n.name == node), None)
            scopes = node_modules(model).get(node) or []
            module = scopes[-1] if scopes else None
    what = f"op {op} (node {node})" if op else "the quantized graph"
    where = f" in module '{module}'" if module else ""
    way_out = f"keep_float: ['{module}'], " if module else ""
    return f"the {fmt} runtime rejects {what}{where}: {text[:200]}; try {way_out}another mode, or another format"
