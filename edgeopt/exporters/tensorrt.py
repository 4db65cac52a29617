"""ONNX → TensorRT engine on a host with an NVIDIA GPU (`edgeopt export --format tensorrt`).

The build and run code lives in the device agent (`edgeopt/profiler/agent.py`):
the agent is copied alone to a Jetson and builds engines there (engines are
specific to the GPU and TensorRT version that build them), so it owns the one
torch-free implementation, and this module only adapts it to edgeopt: InputError,
atomic files, the host-side Q/DQ check and parity against PyTorch.
Needs `pip install 'edgeopt[tensorrt]'` (tensorrt + cuda-python) and a GPU.
UNTESTED ON HARDWARE: edgeopt's CI has no NVIDIA GPU; only the errors are tested.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeopt.errors import InputError
from edgeopt.fileio import write_with
from edgeopt.profiler import agent
from edgeopt.profiler.bundle import check_tensorrt_onnx

Precision = Literal["fp32", "fp16", "int8", "mixed"]


def _agent(fn: Callable[..., Any], *args: Any) -> Any:
    """Call into the agent, turning its AgentError into edgeopt's one-line InputError."""
    try:
        return fn(*args)
    except agent.AgentError as exc:
        raise InputError(str(exc)) from None


def require_tensorrt() -> None:
    """One-line InputError unless tensorrt and cuda-python import here."""
    _agent(agent.tensorrt_modules)


def build_engine(
    onnx_path: Path, engine_path: Path, precision: Precision = "fp16", max_batch: int = 32, workspace_mb: int = 1024
) -> Path:
    """Build a serialized engine (batch 1..max_batch) from `onnx_path` and write it atomically."""
    require_tensorrt()
    precision = check_tensorrt_onnx(Path(onnx_path), precision)
    data = _agent(agent.build_engine, str(onnx_path), precision, 1, 1, max_batch, workspace_mb)
    return write_with(Path(engine_path), lambda tmp: tmp.write_bytes(data))


def run_engine(engine_path: Path, x: np.ndarray) -> np.ndarray:
    """Run a single-input, single-output engine on `x` (one call, whole batch); returns float32."""
    model = _agent(agent.TensorRTModel, str(engine_path), 1, {"batch_size": len(x)})
    return np.asarray(_agent(model.run, np.asarray(x)), dtype=np.float32)


def build_engine_from_model(model: Any, example_input: Any, out: Path, precision: Precision = "fp16") -> Path:
    """PyTorch → ONNX → engine at `out`, kept only if the engine agrees with PyTorch on `example_input`.

    int8 needs a calibrated Q/DQ ONNX: build that from the quantize pass's file with `build_engine`.
    """
    if precision not in ("fp32", "fp16"):
        raise InputError(f"building from a PyTorch model supports fp32 and fp16, not {precision}: for int8 run "
                         f"the quantize pass (format onnx, mode static) and build from its ONNX file")
    require_tensorrt()  # before the slow ONNX export
    from edgeopt.evaluate import torch_outputs
    from edgeopt.exporters import export
    from edgeopt.quantize import parity

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export("onnx", model, example_input, Path(tmp) / "model.onnx")
        build_engine(onnx_path, out, precision, max_batch=max(32, len(example_input)))
    x = np.asarray(example_input, dtype=np.float32)
    try:
        parity.check(torch_outputs(model, x), run_engine(out, x), "fp16", f"tensorrt {precision}")
    except Exception:
        out.unlink(missing_ok=True)
        raise
    return out
