"""ONNX int8 / fp16 with onnxruntime's own tools.

- static int8: QDQ format, per-channel symmetric int8 weights on the ops that carry
  a weight only (`weight_nodes`: MatMul/Conv/Gemm, and elementwise ops with a large
  constant such as the scan's `dt * A`). Where ONNX Runtime has an integer kernel
  (`integer_kernel_nodes`: QLinearMatMul/QLinearConv/QGemm) activations are int8 too,
  with ranges from the calibration split (MinMax); the other weight ops (a MatMul with
  its weight on the left, depthwise Conv, `dt * A`) get int8 weights only
  (`quantize_weights_only`), and the rest of the float math (the scan's
  Exp/Mul/ReduceSum) gets no Q/DQ wrappers at all, which on digits-vmamba cost 4x
  the latency for no bytes;
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
from onnx import numpy_helper

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


def integer_kernel_nodes(model: onnx.ModelProto) -> set[str]:
    """Weight nodes that ONNX Runtime fuses with their Q/DQ into integer kernels: MatMul/Gemm with
    the weight on the right (QLinearMatMul, QGemm) and ungrouped Conv (QLinearConv)."""
    constants = {i.name for i in model.graph.initializer}

    def groups(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    return {
        n.name
        for n in model.graph.node
        if (n.op_type in ("MatMul", "Gemm") and n.input[1] in constants) or (n.op_type == "Conv" and groups(n) == 1)
    }


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
    symmetric_activations: bool = False,
) -> Path:
    """int8 weights and activations (QDQ); activation ranges from `calibration` (N, ...) float32.
    `symmetric_activations` gives every activation zero point 0, as TensorRT requires."""
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
    kernels = sorted(set(chosen) & integer_kernel_nodes(model))
    types = sorted({n.op_type for n in model.graph.node if n.name in kernels})
    with atomic_path(Path(out_path)) as tmp, tempfile.TemporaryDirectory() as work, _quiet():
        preprocessed = _preprocessed(fp32_path, Path(work))
        if not kernels:  # onnxruntime would read the empty list as "every node"
            tmp.write_bytes(preprocessed.read_bytes())
        else:
            ort_quantize_static(
                str(preprocessed), str(tmp), Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=types,
                nodes_to_quantize=kernels,
                extra_options={
                    "ActivationSymmetric": symmetric_activations,
                    "WeightSymmetric": True,
                    # biases stay float: an int32 bias is stored with a per-channel int32 zero point
                    # and a float scale (3x its float bytes), ONNX Runtime still fuses QLinearConv/
                    # QGemm, and TensorRT takes int8 Q/DQ only
                    "QuantizeBias": False,
                },
            )
        quantized = onnx.load(str(tmp))
        quantize_weights_only(quantized, set(chosen) - set(kernels), per_channel)
        onnx.save(quantized, str(tmp))
    return Path(out_path)


def quantize_weights_only(model: onnx.ModelProto, nodes: set[str], per_channel: bool = True) -> None:
    """int8 weights, float activations for `nodes`, in place: each weight (a MatMul/Conv/Gemm's
    constant matrix, an elementwise op's weight-sized constant) is stored symmetric int8 (per output
    channel where `per_channel`: rows of a left MatMul weight, columns of a right one, Conv filters;
    per tensor for elementwise constants) behind a DequantizeLinear. onnxruntime.quantization has
    no weight-only int8 mode for these ops: its static mode also quantizes their activations (Q/DQ
    pairs that no integer kernel consumes: they only add ops, and round the scan's `dt` before its
    Exp), its dynamic mode quantizes activations per call; the scales and rounding are its own."""
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_onnx_initializer

    constants = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    shared = {name for n in model.graph.node if n.name not in nodes for name in n.input}  # a float user keeps it
    done, dequantize = set(), []
    for node in (n for n in model.graph.node if n.name in nodes):
        for index, name in enumerate(node.input):
            init = constants.get(name)
            if init is None or name in done | inputs | shared or init.data_type != onnx.TensorProto.FLOAT:
                continue
            size = int(np.prod(init.dims))
            if not (node.op_type in WEIGHT_OPS and index < 2 and len(init.dims) >= 2) and size < MIN_WEIGHT_ELEMENTS:
                continue  # a bias or a scalar
            done.add(name)
            axis = _channel_axis(node.op_type, index, len(init.dims)) if per_channel else None
            weight = numpy_helper.to_array(init)
            slices = [weight] if axis is None else [weight.take(c, axis) for c in range(weight.shape[axis])]
            params = [compute_data_quant_params(w.ravel(), onnx.TensorProto.INT8, True) for w in slices]
            zero = np.array([p[0] for p in params], np.int8).reshape(-1 if axis is not None else ())
            scale = np.array([p[1] for p in params], np.float32).reshape(-1 if axis is not None else ())
            model.graph.initializer.remove(init)
            model.graph.initializer.append(quantize_onnx_initializer(init, onnx.TensorProto.INT8, zero, scale, axis, f"{name}_int8"))
            model.graph.initializer.append(numpy_helper.from_array(scale, f"{name}_scale"))
            attrs = {} if axis is None else {"axis": axis}  # no zero point: symmetric int8
            dequantize.append(onnx.helper.make_node(
                "DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name], name=f"{name}_DequantizeLinear", **attrs
            ))
    if dequantize:
        nodes_in_order = [*dequantize, *model.graph.node]
        del model.graph.node[:]
        model.graph.node.extend(nodes_in_order)


def _channel_axis(op_type: str, index: int, rank: int) -> int | None:
    """The output-channel axis of a weight: Conv filters, a MatMul's left rows or right columns;
    None (per tensor) elsewhere."""
    if op_type == "Conv":
        return 0
    if op_type == "MatMul":
        return rank - 2 if index == 0 else rank - 1
    return None


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
