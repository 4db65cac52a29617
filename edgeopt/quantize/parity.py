"""Acceptance of a quantized file against the float PyTorch model, per precision.

The figures come from `edgeopt.evaluate.parity`; this module owns the
thresholds and, when a check fails, the diagnosis: the worst output element
and, where the runtime exposes intermediate tensors, the layer whose output
drifted most (lowest signal-to-noise ratio against the float export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeopt.evaluate import parity
from edgeopt.exporters import ExportError


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float
    min_top1_agreement: float
    max_rel: float  # max |error| / max |reference|


# fp16 keeps ~3 decimal digits. int8 is judged on direction (cosine) and decisions (top-1): a
# calibrated output range legitimately clips extreme logits of unseen samples (max_rel ~0.4 on
# digits with LiteRT while top-1 agreement stays 1.0), so max_rel only catches gross breakage.
_INT8 = Thresholds(min_cosine=0.98, min_top1_agreement=0.95, max_rel=0.75)
THRESHOLDS = {"fp16": Thresholds(min_cosine=0.9999, min_top1_agreement=0.99, max_rel=0.01), "int8": _INT8, "mixed": _INT8}


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(((ref - np.asarray(candidate, dtype=np.float64)) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((ref**2).sum()) / noise + 1e-30)


def check(
    reference: np.ndarray,
    candidate: np.ndarray,
    precision: str,
    label: str,
    output_name: str = "output",
    thresholds: Thresholds | None = None,
    worst_layer: Callable[[], str | None] | None = None,
    decide: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Parity figures; raises ExportError naming the worst output (and layer) when below `thresholds`."""
    limits = thresholds or THRESHOLDS[precision]
    figures = parity(reference, candidate, decide)
    failures = [
        f"cosine {figures['cosine']:.4f} < {limits.min_cosine}" if figures["cosine"] < limits.min_cosine else "",
        f"top-1 agreement {figures['top1_agreement']:.3f} < {limits.min_top1_agreement}"
        if figures["top1_agreement"] < limits.min_top1_agreement else "",
        f"max rel error {figures['max_rel']:.3g} > {limits.max_rel}" if figures["max_rel"] > limits.max_rel else "",
    ]
    failures = [f for f in failures if f]
    if failures:
        err = np.abs(np.asarray(reference, np.float64) - np.asarray(candidate, np.float64))
        sample, *index = np.unravel_index(int(err.argmax()), err.shape)
        where = f"worst output '{output_name}'[sample {sample}, index {tuple(int(i) for i in index)}] |error| {err.max():.3g}"
        layer = worst_layer() if worst_layer else None
        layer_text = f"; worst layer {layer}" if layer else ""
        raise ExportError(
            f"{label} parity check failed: {', '.join(failures)}; {where}{layer_text}; "
            "try mixed_precision: true, keep_float: [<layer>], or a higher precision"
        )
    return {**figures, "thresholds": asdict(limits)}


def onnx_tensor_snr(fp32_path: Path, quant_path: Path, x: np.ndarray) -> dict[str, float]:
    """SNR (dB) of every intermediate tensor the quantized ONNX model still computes under its float name."""
    import onnxruntime as ort

    float_model, quant_model = onnx.load(str(fp32_path)), onnx.load(str(quant_path))
    produced = {o for n in quant_model.graph.node for o in n.output}
    names = [o for n in float_model.graph.node for o in n.output if o in produced]
    outputs = {}
    for model in (float_model, quant_model):
        existing = {o.name for o in model.graph.output}
        for name in names:
            if name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        outputs[id(model)] = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    ref, got = outputs[id(float_model)], outputs[id(quant_model)]
    return {name: snr_db(ref[name], got[name]) for name in names}


def onnx_worst_layer(fp32_path: Path, quant_path: Path, x: np.ndarray) -> str | None:
    from edgeopt.quantize.onnx_quant import node_modules

    model = onnx.load(str(fp32_path))
    scopes = node_modules(model)
    module_of = {o: (scopes[n.name] or ["<root>"])[-1] for n in model.graph.node for o in n.output}
    return _worst(onnx_tensor_snr(fp32_path, quant_path, x), module_of.get)


def tflite_worst_layer(fp32_path: Path, quant_path: Path, x: np.ndarray, layers: list[str]) -> str | None:
    from edgeopt.quantize.tflite_quant import tensor_errors, tensor_module

    return _worst(tensor_errors(fp32_path, quant_path, x), lambda name: tensor_module(name, layers))


def _worst(snr: dict[str, float], module_of: Callable[[str], str | None]) -> str | None:
    named = [(value, module_of(name)) for name, value in snr.items() if np.isfinite(value) and module_of(name)]
    if not named:
        return None
    value, module = min(named)
    return f"'{module}' (SNR {value:.1f} dB)"
