"""ONNX → TensorRT engine, and running one (TensorRT 10 Python API; `pip install edgeopt[tensorrt]`).

Engines are specific to the GPU and TensorRT version that build them, so a
Jetson profile ships the ONNX file and the device builds its engine there.
int8 engines use explicit quantization: the ONNX must already carry Q/DQ nodes
(the `quantize` pass, format onnx, mode static), TensorRT's calibrators being
deprecated in 10.x. Device memory comes from torch.cuda (already a dependency)
instead of pycuda / cuda-python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from edgeopt.errors import InputError
from edgeopt.fileio import write_with

Precision = Literal["fp32", "fp16", "int8"]


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(
            "TensorRT is not installed: build engines on the NVIDIA device (pip install 'edgeopt[tensorrt]')"
        ) from None
    return trt


def build_engine(
    onnx_path: Path, engine_path: Path, precision: Precision = "fp16", max_batch: int = 32, workspace_mb: int = 1024
) -> Path:
    """Parse `onnx_path`, build a serialized engine with the precision flags, write it atomically."""
    trt = _tensorrt()
    onnx_bytes = Path(onnx_path).read_bytes()
    if precision == "int8" and b"QuantizeLinear" not in onnx_bytes:
        raise InputError("int8 TensorRT engines need a Q/DQ ONNX model: run the quantize pass (format onnx, mode static)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape and shape[0] == -1:  # the exporters' dynamic batch dimension
            rest = shape[1:]
            profile.set_shape(tensor.name, (1, *rest), (1, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"TensorRT failed to build an engine from {onnx_path} ({precision}); see its log above")
    return write_with(Path(engine_path), lambda tmp: tmp.write_bytes(bytes(serialized)))


def run_engine(engine_path: Path, x: np.ndarray) -> np.ndarray:
    """Run a single-input, single-output engine on `x` (one call, whole batch); returns the output."""
    trt = _tensorrt()
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise InputError(f"cannot load TensorRT engine {engine_path} (built for another GPU or TensorRT version?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    dtype = {n: torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(n)))).dtype for n in names}
    feed = torch.from_numpy(np.ascontiguousarray(x)).to("cuda", dtype[inputs[0]])
    context.set_input_shape(inputs[0], tuple(feed.shape))
    context.set_tensor_address(inputs[0], feed.data_ptr())
    result = torch.empty(tuple(context.get_tensor_shape(outputs[0])), dtype=dtype[outputs[0]], device="cuda")
    context.set_tensor_address(outputs[0], result.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise InputError(f"TensorRT engine {engine_path} failed to run")
    stream.synchronize()
    return result.float().cpu().numpy()
