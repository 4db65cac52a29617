"""TensorRT is only on the NVIDIA devices; here we check the one-line error that says so."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgeopt.errors import InputError
from edgeopt.exporters.tensorrt import build_engine, run_engine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")


def test_build_without_tensorrt_is_a_one_line_input_error(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(InputError) as err:
        build_engine(onnx_file, tmp_path / "m.engine", "fp16")
    assert "TensorRT is not installed" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m.engine").exists()


def test_run_without_tensorrt_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="TensorRT is not installed"):
        run_engine(tmp_path / "m.engine", np.zeros((1, 4), np.float32))
