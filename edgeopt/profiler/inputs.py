"""Synthetic inputs for timing a bare model file (`edgeopt profile model.onnx` without a recipe).

Latency, memory and init time do not depend on the input values, so a model file can be
profiled without its dataset: random inputs of the model's own input shape (read from the
ONNX graph or the TFLite interpreter), no labels, hence no accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeopt.errors import InputError

N_SAMPLES = 16


def input_shape(model_path: Path, runtime: str) -> tuple[int, ...]:
    """The first input's shape; a dynamic dimension (batch, usually) reads as 1."""
    if runtime == "onnxruntime":
        import onnx

        try:
            graph = onnx.load(str(model_path), load_external_data=False).graph
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends for a bad file
            raise InputError(f"{model_path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if not inputs:
            raise InputError(f"{model_path}: the ONNX graph has no input")
        dims = inputs[0].type.tensor_type.shape.dim
        return tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    if runtime == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        try:
            details = Interpreter(model_path=str(model_path)).get_input_details()[0]
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{model_path}: not a readable TFLite model ({str(exc).splitlines()[0]})") from None
        return tuple(int(s) if s > 0 else 1 for s in details["shape"])
    raise InputError(f"profiling a {runtime} model without --recipe is not supported: pass --recipe "
                     "(its model gives the input shape)")


def synthetic_inputs(model_path: Path, runtime: str, n: int = N_SAMPLES, seed: int = 0) -> tuple[np.ndarray, int]:
    """`n` random float32 inputs shaped like the model's input, and the model's batch size
    (its fixed batch dimension, or 1 when the batch is dynamic)."""
    shape = input_shape(Path(model_path), runtime)
    if not shape:
        raise InputError(f"{model_path}: the model's input is a scalar; give --recipe")
    batch = shape[0]
    x = np.random.default_rng(seed).standard_normal((max(n, batch), *shape[1:]), dtype=np.float32)
    return x, batch
