"""ONNX int8 / fp16 with onnxruntime's own tools.

- static int8: QDQ format, per-channel symmetric int8 weights, int8 activations
  whose ranges come from the calibration split (MinMax), on the ops that carry a
  weight only (`weight_nodes`: MatMul/Conv/Gemm, and elementwise ops with a large
  constant such as the scan's `dt * A`): the rest of the float math (a selective
  scan's Exp/Mul/ReduceSum) gets no Q/DQ wrappers, which on digits-vmamba cost
  4x the latency for no bytes;
- dynamic int8: int8 weights, activations quantized at run time
  (ConvInteger / MatMulInteger);
- fp16: `onnxruntime.transformers.float16` with `keep_io_types`, so callers keep
  feeding float32.

`keep_float` names PyTorch module paths to leave in float (`only`, when given,
limits quantization to those modules); the dynamo exporter
records each node's module path in its `pkg.torch.onnx.name_scopes` metadata,
which is how a module path becomes the node names the tools exclude.
"""

from __future__ import annotations

import ast
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from edgeopt.fileio import atomic_path, write_with

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
WEIGHT_OPS = ("MatMul", "Conv", "Gemm")  # where int8 saves bytes; MatMul includes a weight on the left
MIN_WEIGHT_ELEMENTS = 1024  # an elementwise op's constant this big is a weight (SS2D's A), not a scalar


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose int8 form saves bytes: weight ops, and elementwise ops with a weight-sized constant."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in WEIGHT_OPS
        or (n.op_type in ("Mul", "Add") and any(sizes.get(i, 0) >= MIN_WEIGHT_ELEMENTS for i in n.input))
    ]


def node_modules(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node name → the module paths that contain it (outermost first, root excluded)."""
    result = {}
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), [])
        result[node.name] = [s for s in scopes[:-1] if s]
    return result


def nodes_in(model: onnx.ModelProto, modules: Iterable[str]) -> list[str]:
    """Names of the nodes that belong to any of `modules` (a module path covers its children)."""
    wanted = set(modules)
    return [name for name, scopes in node_modules(model).items() if wanted.intersection(scopes)]


def _input_name(model: onnx.ModelProto) -> str:
    initializers = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def _preprocessed(fp32_path: Path, workdir: Path) -> Path:
    """onnxruntime's documented first step: shape inference + graph cleanup (keeps node names)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "preprocessed.onnx"
    with _quiet():
        quant_pre_process(str(fp32_path), str(out))
    return out


def quantize_static(
    fp32_path: Path,
    calibration: np.ndarray,
    out_path: Path,
    per_channel: bool = True,
    keep_float: Iterable[str] = (),
    only: Iterable[str] | None = None,
    batch_size: int = 32,
) -> Path:
    """int8 weights and activations (QDQ); activation ranges from `calibration` (N, ...) float32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    model = onnx.load(str(fp32_path))
    name = _input_name(model)
    batches = [np.ascontiguousarray(calibration[i : i + batch_size], dtype=np.float32)
               for i in range(0, len(calibration), batch_size)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {name: x}

    excluded = set(nodes_in(model, keep_float))
    scope = set(weight_nodes(model)) if only is None else set(weight_nodes(model)).intersection(nodes_in(model, only))
    chosen = sorted(scope - excluded)
    if not chosen:  # onnxruntime reads an empty list as "every node": nothing to quantize here
        return write_with(Path(out_path), lambda tmp: tmp.write_bytes(Path(fp32_path).read_bytes()))
    types = sorted({n.op_type for n in model.graph.node if n.name in chosen})
    with atomic_path(Path(out_path)) as tmp, tempfile.TemporaryDirectory() as work, _quiet():
        ort_quantize_static(
            str(_preprocessed(fp32_path, Path(work))), str(tmp), Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=types,
            nodes_to_quantize=chosen,
            extra_options={
                "ActivationSymmetric": False,
                "WeightSymmetric": True,
                # `dt * A` feeds an Exp: its product stays float (int8 there only adds a rounding step)
                "OpTypesToExcludeOutputQuantization": ["Mul", "Add"],
            },
        )
    return Path(out_path)


def quantize_dynamic(
    fp32_path: Path,
    out_path: Path,
    per_channel: bool = True,
    keep_float: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> Path:
    """int8 weights; activations quantized per call by the runtime (no calibration)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    model = onnx.load(str(fp32_path))
    with atomic_path(Path(out_path)) as tmp, tempfile.TemporaryDirectory() as work, _quiet():
        ort_quantize_dynamic(
            str(_preprocessed(fp32_path, Path(work))), str(tmp),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=None if only is None else nodes_in(model, only),
            nodes_to_exclude=nodes_in(model, keep_float),
        )
    return Path(out_path)


def convert_fp16(
    fp32_path: Path, out_path: Path, keep_float: Iterable[str] = (), only: Iterable[str] | None = None
) -> Path:
    """fp16 weights and compute; inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    blocked = set(nodes_in(model, keep_float))
    if only is not None:
        blocked |= {n.name for n in model.graph.node} - set(nodes_in(model, only))
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(blocked) or None)
    with atomic_path(Path(out_path)) as tmp:
        onnx.save(half, str(tmp))
    return Path(out_path)


class _quiet:
    """onnxruntime.quantization logs a warning per un-preprocessed model; keep CLI output ours."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)
