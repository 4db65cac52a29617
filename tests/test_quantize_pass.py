"""The `quantize` pass on a conv net trained on real digits, in the real runtimes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeopt.passes.quantize  # noqa: F401  (registers the pass until it is a built-in)
from edgeopt.artifact import ModelArtifact, ModelSource
from edgeopt.data import load_dataset
from edgeopt.evaluate import run_onnx, run_tflite, torch_outputs
from edgeopt.exporters import ExportError
from edgeopt.exporters.onnx import export_onnx
from edgeopt.exporters.tflite import export_tflite
from edgeopt.passes import PassContext, make_pass
from edgeopt.profiles import load_profile
from edgeopt.quantize.sensitivity import accuracy


class DigitsCNN(nn.Module):
    """Conv features + MLP head; the head's weights dominate (~70 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", size=8)


@pytest.fixture(scope="module")
def cnn(splits) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(6):
        for x, y in splits.train.batches(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    assert accuracy(torch_outputs(model, splits.eval.x), splits.eval.y.numpy()) > 95
    return model


def artifact_for(model: nn.Module, tmp_path: Path) -> ModelArtifact:
    art = ModelArtifact("torch", tmp_path / "w.safetensors", ModelSource("test-cnn"), (1, 8, 8))
    return art.with_module(model, tmp_path / "w.safetensors")


def run_pass(options: dict, model: nn.Module, splits, tmp_path: Path) -> tuple[ModelArtifact, dict]:
    step = tmp_path / "step"
    step.mkdir(exist_ok=True)
    art = artifact_for(model, tmp_path)
    ctx = PassContext(splits=splits, profile=load_profile("x86-cpu"), step_dir=step, history=[art])
    return make_pass("quantize", options).run(art, ctx), ctx.metrics


@pytest.mark.parametrize(
    ("fmt", "mode", "min_ratio"),
    [("onnx", "static", 3.0), ("onnx", "dynamic", 3.0), ("onnx", "fp16", 1.8), ("tflite", "static", 3.0), ("tflite", "dynamic", 3.0)],
)
def test_each_format_and_precision_loads_and_holds_accuracy(fmt, mode, min_ratio, cnn, splits, tmp_path):
    out, metrics = run_pass({"format": fmt, "mode": mode}, cnn, splits, tmp_path)
    assert out.format == fmt and out.path.parent == tmp_path / "step" and out.path.is_file()
    assert out.precision == ("fp16" if mode == "fp16" else "int8") and out.module is None
    # the artifact loads in its own runtime and agrees with PyTorch on eval samples
    x = splits.eval.x.numpy()
    got = (run_onnx if fmt == "onnx" else run_tflite)(out.path, x)
    reference = torch_outputs(cnn, x)
    assert accuracy(reference, splits.eval.y.numpy()) - accuracy(got, splits.eval.y.numpy()) <= 1.0
    assert metrics["accuracy_drop"] <= 1.0
    assert metrics["parity"]["cosine"] >= (0.9999 if mode == "fp16" else 0.99)
    assert metrics["parity"]["top1_agreement"] >= 0.95
    assert metrics["size_ratio"] >= min_ratio, metrics


def test_onnx_static_is_qdq_per_channel_int8(cnn, splits, tmp_path):
    import onnx
    from onnx import numpy_helper

    out, _ = run_pass({"format": "onnx", "mode": "static"}, cnn, splits, tmp_path)
    graph = onnx.load(str(out.path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 2 and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    init = {i.name: i for i in graph.initializer}
    # per-channel: each int8 conv kernel is dequantized with one scale per output channel
    conv_scales = [
        numpy_helper.to_array(init[n.input[1]]).shape
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in init and len(init[n.input[0]].dims) == 4
        and init[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    assert sorted(conv_scales) == [(16,), (32,)]
    # activations are int8 too (QuantizeLinear with an int8 zero point)
    zero_points = [init[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and set(zero_points) == {onnx.TensorProto.INT8}


def test_tflite_static_has_int8_weights_and_activations(cnn, splits, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    out, _ = run_pass({"format": "tflite", "mode": "static"}, cnn, splits, tmp_path)
    interpreter = Interpreter(model_path=str(out.path))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"QUANTIZE", "DEQUANTIZE", "CONV_2D", "FULLY_CONNECTED"} <= ops
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            assert details[op["inputs"][0]]["dtype"] == np.int8  # activation in
            assert details[op["outputs"][0]]["dtype"] == np.int8  # activation out
            assert details[op["inputs"][1]]["dtype"] == np.int8  # weights
        elif op["op_name"] == "MAX_POOL_2D":  # weightless ops stay float: no int8 round trip for no bytes
            assert details[op["inputs"][0]]["dtype"] == np.float32
    assert interpreter.get_input_details()[0]["dtype"] == np.float32  # callers still feed float


def outlier_model(cnn: nn.Module, x: torch.Tensor, scale: float = 1000.0) -> nn.Module:
    """The same function, but the most active hidden unit of head.1 is ×scale (head.3 undoes it):
    a per-tensor int8 range for that activation then crushes every other unit to zero."""
    model = copy.deepcopy(cnn)
    with torch.no_grad():
        hidden = model.head[:3](model.features(x))
        unit = int(hidden.mean(0).argmax())
        model.head[1].weight[unit] *= scale
        model.head[1].bias[unit] *= scale
        model.head[3].weight[:, unit] /= scale
    return model


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_mixed_precision_keeps_sensitive_layer_in_float(fmt, cnn, splits, tmp_path):
    model = outlier_model(cnn, splits.calib.x)
    x, y = splits.eval.x.numpy(), splits.eval.y.numpy()
    float_acc = accuracy(torch_outputs(model, x), y)
    # the budget is tight: plain int8 misses it by far
    from edgeopt.passes.quantize import quantize_file

    exporter = export_onnx if fmt == "onnx" else export_tflite
    fp32 = exporter(model, torch.zeros(2, 1, 8, 8), tmp_path / f"fp32.{fmt}", keep_metadata=True)
    plain = quantize_file(fmt, "static", fp32, splits.calib.x.numpy()[:128], tmp_path / f"plain.{fmt}")
    assert float_acc - accuracy((run_onnx if fmt == "onnx" else run_tflite)(plain, x), y) > 5.0

    out, metrics = run_pass(
        {"format": fmt, "mode": "static", "mixed_precision": True, "max_accuracy_drop": 1.0}, model, splits, tmp_path
    )
    kept = metrics["kept_in_float"]
    assert 1 <= len(kept) < 4 and set(kept) <= {"head.1", "head.3"}
    assert out.precision == "mixed"
    report = metrics["mixed_precision"]
    sens = report["sensitivity_nsr"]
    assert set(sens) == {"features.0", "features.2", "head.1", "head.3"}
    # the layers kept in float are the most sensitive ones, and the report says by how much
    assert min(sens[k] for k in kept) >= max(v for name, v in sens.items() if name not in kept)
    assert report["kept_in_float"][kept[0]]["sensitivity_nsr"] == sens[kept[0]]
    assert metrics["accuracy_drop"] <= 1.0 and report["trials"][0]["kept_in_float"] == []
    # the conv layers stayed int8
    assert metrics["size_ratio"] > 1.0


def test_parity_failure_names_worst_output_and_layer(cnn, splits, tmp_path):
    model = outlier_model(cnn, splits.calib.x)
    with pytest.raises(ExportError) as err:
        run_pass({"format": "onnx", "mode": "static"}, model, splits, tmp_path)
    message = str(err.value)
    assert "parity check failed" in message and "worst output 'output'[sample" in message
    assert "worst layer '" in message and "dB" in message
    assert not (tmp_path / "step" / "model.onnx").exists()  # no half-accepted artifact left behind


class ErfGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(x) * 0.5)


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.gate = ErfGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x.flatten(1)))


@pytest.mark.parametrize(("fmt", "op"), [("tflite", "aten.erfinv"), ("onnx", "prims.erf_inv")])
def test_op_the_format_cannot_express_names_op_and_module(fmt, op, splits, tmp_path):
    with pytest.raises(ExportError) as err:
        run_pass({"format": fmt, "mode": "dynamic"}, GatedMLP().eval(), splits, tmp_path)
    message = str(err.value)
    assert op in message and "in module 'gate (ErfGate)'" in message
    assert "another format" in message and "\n" not in message


def test_bad_options_are_one_line_errors(cnn, splits, tmp_path):
    from edgeopt.errors import InputError

    with pytest.raises(InputError, match="fp16"):
        make_pass("quantize", {"format": "tflite", "mode": "fp16"})
    with pytest.raises(InputError, match="mode"):
        make_pass("quantize", {"mode": "int4"})
    with pytest.raises(ExportError, match="keep_float names no module: nope"):
        run_pass({"format": "onnx", "keep_float": ["nope"]}, cnn, splits, tmp_path)
    exported = ModelArtifact("onnx", tmp_path / "m.onnx", ModelSource("test-cnn"), (1, 8, 8))
    ctx = PassContext(splits=splits, profile=load_profile("x86-cpu"), step_dir=tmp_path, history=[exported])
    with pytest.raises(ExportError, match="put it before export"):
        make_pass("quantize", {}).run(exported, ctx)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_keep_float_leaves_exactly_that_layer_in_float(fmt, cnn, splits, tmp_path):
    out, metrics = run_pass({"format": fmt, "mode": "static", "keep_float": ["head.1"]}, cnn, splits, tmp_path)
    assert out.precision == "mixed" and metrics["kept_in_float"] == ["head.1"]
    if fmt == "onnx":
        import onnx

        dtypes = {tuple(i.dims): i.data_type for i in onnx.load(str(out.path)).graph.initializer}
        assert dtypes[(128, 512)] == onnx.TensorProto.FLOAT  # head.1's weight
        assert dtypes[(10, 128)] == onnx.TensorProto.INT8  # head.3's weight
    else:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(out.path))
        details = {d["index"]: d for d in interpreter.get_tensor_details()}
        weights = {
            tuple(details[op["inputs"][1]]["shape"]): details[op["inputs"][1]]["dtype"]
            for op in interpreter._get_ops_details()
            if op["op_name"] == "FULLY_CONNECTED"
        }
        assert weights == {(128, 512): np.float32, (10, 128): np.int8}
    assert metrics["accuracy_drop"] <= 1.0
