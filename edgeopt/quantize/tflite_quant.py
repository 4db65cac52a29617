"""TFLite int8 with the LiteRT toolchain: ai-edge-quantizer recipes on the fp32 .tflite.

- static int8: int8 per-channel weights *and* int8 activations (ranges from the
  calibration split) on fully-connected and conv ops; BATCH_MATMUL (SS2D's x/dt
  projections, weight on the left) gets int8 weights with float activations
  (weight-only: int8 activations there cost digits-vmamba 6 top-1 points);
  elementwise ops that carry a weight-sized constant (the scan's `dt * A`) are
  int8 per-tensor; every other op (the scan's Exp/Mul/Sum) stays float; the model keeps float32 inputs/outputs (one QUANTIZE after
  the input, one DEQUANTIZE before the output) so every caller feeds it like the
  fp32 model;
- dynamic-range int8: int8 weights, activations quantized per call by the kernels.

ai-edge-quantizer picks ops by a regex on each op's output tensor name, and
litert-torch names tensors by the module stack (`Net/Sequential_body/Linear_fc;`),
which is how a PyTorch module path in `keep_float` (or `only`) becomes a recipe rule.
The model's last op writes the tensor `serving_default_output_0_output`, so an op is
matched through its weights' names too and the rule lists its output names exactly.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgeopt.fileio import write_with

STATIC_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")  # int8 weights and activations
WEIGHT_ONLY_OPS = ("BATCH_MATMUL",)  # int8 weights dequantized to float at load
ELEMENTWISE_OPS = ("MUL", "ADD", "SUB", "CONCATENATION")  # int8 only where they hold a weight
MIN_WEIGHT_ELEMENTS = 1024  # a constant this big is a weight (SS2D's A), not a scalar


def module_regex(module_path: str) -> str:
    """Regex for the tensors litert-torch emits inside `module_path` (a fused name may hold several).

    A ModuleList is never called, so it leaves no name scope (`layers.0` shows up as
    `.../Sequential_0/...`): a component followed by an index is optional."""
    names = module_path.split(".")
    parts = "".join(
        f"(/[^/;]*_{re.escape(p)})?" if i + 1 < len(names) and names[i + 1].isdigit() else f"/[^/;]*_{re.escape(p)}"
        for i, p in enumerate(names)
    )
    return rf"(^|;)[^/;]*{parts}(;|/|$)"


def op_scopes(path: Path, modules: Iterable[str]) -> dict[str, str]:
    """Module path → recipe regex over the output names of its ops (matched by outputs or weights)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    computed = {t for op in ops for t in op["outputs"]} | {d["index"] for d in interpreter.get_input_details()}
    scopes = {}
    for module in modules:
        regex = module_regex(module)
        outputs = sorted({
            names[out]
            for op in ops
            if any(re.search(regex, names[t]) for t in [*op["outputs"], *(i for i in op["inputs"] if i >= 0 and i not in computed)])
            for out in op["outputs"]
        })
        # ai-edge-quantizer's scope is the op's output names, each followed by ";"
        scopes[module] = "(^|;)(" + "|".join(map(re.escape, outputs)) + ");" if outputs else regex
    return scopes


def tensor_module(tensor_name: str, modules: Iterable[str]) -> str | None:
    """The deepest of `modules` whose tensors include `tensor_name`."""
    hits = [m for m in modules if re.search(module_regex(m), tensor_name)]
    return max(hits, key=lambda m: m.count("."), default=None)


def _quantizer(fp32_path: Path):
    from edgeopt.console import third_party_quiet

    with third_party_quiet():
        from ai_edge_quantizer import quantizer

    return quantizer.Quantizer(str(fp32_path))


def _granularity(per_channel: bool):
    from ai_edge_quantizer.qtyping import QuantGranularity

    return QuantGranularity.CHANNELWISE if per_channel else QuantGranularity.TENSORWISE


def _scopes(path: Path, only: Iterable[str] | None) -> list[str]:
    """Recipe scopes: the whole model, or just the modules in `only`."""
    return [".*"] if only is None else list(op_scopes(path, only).values())


def _finish(q, fp32_path: Path, keep_float: Iterable[str], out_path: Path, calibration: dict | None = None) -> Path:
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    for scope in op_scopes(fp32_path, keep_float).values():  # later rules win in ai-edge-quantizer
        q.update_quantization_recipe(scope, TFLOperationName.ALL_SUPPORTED, None, AlgorithmName.NO_QUANTIZE)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        qsvs = q.calibrate(calibration) if calibration else None
        if calibration and not qsvs:  # the scope holds no op the quantizer supports: nothing to do
            return write_with(Path(out_path), lambda tmp: tmp.write_bytes(Path(fp32_path).read_bytes()))
        result = q.quantize(qsvs, enable_progress_report=False)
    return write_with(Path(out_path), lambda tmp: tmp.write_bytes(result.quantized_model))


def signature_input(path: Path) -> tuple[str, str]:
    """(signature key, input name) of a single-input model."""
    from ai_edge_litert.interpreter import Interpreter

    key, sig = next(iter(Interpreter(model_path=str(path)).get_signature_list().items()))
    return key, sig["inputs"][0]


def quantize_static(
    fp32_path: Path,
    calibration: np.ndarray,
    out_path: Path,
    per_channel: bool = True,
    keep_float: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> Path:
    """int8 weights and activations; `calibration` is (N, ...) float32, fed one sample at a time (batch-1 model)."""
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    q = _quantizer(fp32_path)
    for regex in _scopes(fp32_path, only):
        for op in STATIC_OPS:
            q.add_static_config(regex, TFLOperationName(op), 8, 8, _granularity(per_channel))
        for op in WEIGHT_ONLY_OPS:
            q.add_weight_only_config(regex, TFLOperationName(op), 8, _granularity(per_channel))
    if only is None:  # per-layer trials (`only`) measure the weight layers
        for op, scope in weighted_elementwise(fp32_path):
            q.add_static_config(scope, TFLOperationName(op), 8, 8, _granularity(False))
    for io_op in (TFLOperationName.INPUT, TFLOperationName.OUTPUT):  # float32 in, float32 out
        q.update_quantization_recipe(".*", io_op, None, AlgorithmName.NO_QUANTIZE)
    key, name = signature_input(fp32_path)
    samples = [{name: np.asarray(x[None], dtype=np.float32)} for x in calibration]
    return _finish(q, fp32_path, keep_float, out_path, {key: samples})


def _graph(path: Path) -> tuple[dict[int, dict], list[dict], set[int]]:
    """The model's tensor details by index, its ops, and the tensors computed at run time
    (op outputs and model inputs): every other op input is a constant."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    computed = {t for op in ops for t in op["outputs"]} | {d["index"] for d in interpreter.get_input_details()}
    return details, ops, computed


def const_lhs_matmuls(path: Path) -> list[str]:
    """Scopes of BATCH_MATMULs whose *left* operand is a weight (einsum `kcd,bkdl` in SS2D):
    LiteRT's hybrid kernel only takes float lhs × int8 rhs, so dynamic-range int8 must skip them."""
    details, ops, computed = _graph(path)
    return [
        "(^|;)" + re.escape(details[op["outputs"][0]]["name"]) + ";"
        for op in ops
        if op["op_name"] == "BATCH_MATMUL" and op["inputs"][0] not in computed
    ]


def weighted_elementwise(path: Path) -> list[tuple[str, str]]:
    """(op name, scope) of the elementwise ops with a weight-sized constant input (SS2D's A, which
    litert-torch stores twice: in `dt * A` and in a CONCATENATION feeding the chunk decays)."""
    details, ops, computed = _graph(path)
    return [
        (op["op_name"], "(^|;)" + re.escape(details[op["outputs"][0]]["name"]) + ";")
        for op in ops
        if op["op_name"] in ELEMENTWISE_OPS
        and any(i >= 0 and i not in computed and np.prod(details[i]["shape"]) >= MIN_WEIGHT_ELEMENTS for i in op["inputs"])
    ]


def quantize_dynamic(
    fp32_path: Path,
    out_path: Path,
    per_channel: bool = True,
    keep_float: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> Path:
    """int8 weights; float activations that the kernels quantize on the fly (no calibration)."""
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    q = _quantizer(fp32_path)
    for regex in _scopes(fp32_path, only):
        q.add_dynamic_config(regex, TFLOperationName.ALL_SUPPORTED, 8, _granularity(per_channel))
    for scope in const_lhs_matmuls(fp32_path):  # after: later rules win
        q.update_quantization_recipe(scope, TFLOperationName.BATCH_MATMUL, None, AlgorithmName.NO_QUANTIZE)
    return _finish(q, fp32_path, keep_float, out_path)


def tensor_errors(fp32_path: Path, quant_path: Path, x: np.ndarray) -> dict[str, float]:
    """Per-tensor SNR (dB, higher is better) of the quantized model against the float one, from
    ai-edge-quantizer's validator (it dequantizes int8 tensors before comparing; reports a power ratio)."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.utils.validation_utils import ValidationErrorMetric

    key, name = signature_input(fp32_path)
    q = quantizer.Quantizer(str(fp32_path), previous_quantized_model=str(quant_path))
    data = {key: [{name: np.asarray(s[None], dtype=np.float32)} for s in x]}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = q.validate(data, error_metrics=[ValidationErrorMetric.SNR])
    return {k: 10 * float(np.log10(v["snr"] + 1e-30)) for k, v in result.get_all_tensor_results().items()}
