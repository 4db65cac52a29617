"""The trained digits VMamba exports to ONNX and TFLite and matches PyTorch in the real runtimes.

The 224x224 VMamba-T parity runs in benchmarks/bench_vmamba_export.py (export takes minutes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeopt.data import load_dataset
from edgeopt.models import build_model
from edgeopt.ops import selective_scan

CHECKPOINT = Path(__file__).resolve().parents[1] / "targets/checkpoints/digits-vmamba.safetensors"


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    torch.onnx.export(model, example, str(path), dynamo=True)
    return path


def run_onnx(path: Path, *inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)[0]


def onnx_node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path)).graph.node)


def export_tflite(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    import litert_torch

    litert_torch.convert(model, example).export(str(path))
    return path


def run_tflite(path: Path, x: torch.Tensor) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.numpy())
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def assert_parity(got: np.ndarray, want: torch.Tensor) -> None:
    """max |error| <= 1e-4 of the output scale, and the same top-1 for every sample."""
    want = want.numpy()
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-4 * scale
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.fixture(scope="module")
def digits():
    model = build_model("digits-vmamba", checkpoint=CHECKPOINT)
    x = load_dataset("digits", size=32).eval.x[:8]
    with torch.no_grad():
        return model, x, model(x)


def test_digits_vmamba_onnx_parity(digits, tmp_path):
    model, x, want = digits
    path = export_onnx(model, (x,), tmp_path / "digits.onnx")
    assert_parity(run_onnx(path, x), want)
    assert onnx_node_count(path) < 1000


def test_digits_vmamba_tflite_parity(digits, tmp_path):
    model, x, want = digits
    path = export_tflite(model, (x,), tmp_path / "digits.tflite")
    assert_parity(run_tflite(path, x), want)


class Scan(nn.Module):
    def forward(self, u, delta, A, B, C, D):
        return selective_scan(u, delta, A, B, C, D, delta_softplus=True)


def test_exported_scan_is_compact_and_exact(tmp_path):
    """L = 1024 tokens: a per-token unroll would need thousands of nodes; chunks need ~sqrt(L)."""
    g = torch.Generator().manual_seed(0)
    dim, length, nstate = 8, 1024, 16
    inputs = (
        torch.randn(1, dim, length, generator=g),
        torch.randn(1, dim, length, generator=g) - 1,
        -torch.exp(torch.randn(dim, nstate, generator=g)),
        torch.randn(1, 2, nstate, length, generator=g),
        torch.randn(1, 2, nstate, length, generator=g),
        torch.randn(dim, generator=g),
    )
    path = export_onnx(Scan(), inputs, tmp_path / "scan.onnx")
    assert onnx_node_count(path) < 400  # 287 with T = 32; a per-token unroll is > 5,000
    want = selective_scan(*inputs[:5], inputs[5], delta_softplus=True, backend="reference")
    got = run_onnx(path, *inputs)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))
