"""A small real model for the profiler tests: logistic regression on the digits scans,
written as an ONNX MatMul+Add graph and (optionally) as a TFLite model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.data import load_dataset


@dataclass(frozen=True)
class DigitsModel:
    onnx_path: Path
    weight: np.ndarray  # (64, 10)
    bias: np.ndarray  # (10,)
    eval_x: np.ndarray
    eval_y: np.ndarray

    @property
    def numpy_top1(self) -> float:
        """Reference accuracy computed here in numpy, independent of any runtime."""
        logits = self.eval_x @ self.weight + self.bias
        return float((logits.argmax(1) == self.eval_y).mean())


def write_onnx(weight: np.ndarray, bias: np.ndarray, path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"])],
        "digits_logreg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_tflite(weight: np.ndarray, bias: np.ndarray, path: Path) -> Path:
    """The same linear model through litert-torch (fixed batch of 1)."""
    import litert_torch
    import torch

    layer = torch.nn.Linear(*weight.shape).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.T))
        layer.bias.copy_(torch.from_numpy(bias))
    litert_torch.convert(layer, (torch.zeros(1, weight.shape[0]),)).export(str(path))
    return path


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    from sklearn.linear_model import LogisticRegression

    splits = load_dataset("digits", flatten=True)
    clf = LogisticRegression(max_iter=500).fit(splits.train.x.numpy(), splits.train.y.numpy())
    weight = clf.coef_.T.astype(np.float32).copy()
    bias = clf.intercept_.astype(np.float32)
    path = write_onnx(weight, bias, tmp_path_factory.mktemp("digits") / "digits.onnx")
    return DigitsModel(path, weight, bias, splits.eval.x.numpy(), splits.eval.y.numpy())
