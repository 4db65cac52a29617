"""The `quantize` pass on the trained digits VMamba: weight ops int8, the selective scan float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeopt.artifact import ModelArtifact, ModelSource
from edgeopt.data import load_dataset
from edgeopt.errors import InputError
from edgeopt.models import build_model
from edgeopt.passes import PassContext, make_pass
from edgeopt.passes.quantize import QuantizeConfig, resolved
from edgeopt.profiles import load_profile

CHECKPOINT = Path("targets/checkpoints/digits-vmamba.safetensors")


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", size=32)


def run_pass(options: dict, splits, tmp_path: Path, profile: str = "x86-cpu") -> tuple[ModelArtifact, dict]:
    art = ModelArtifact("torch", CHECKPOINT, ModelSource("digits-vmamba"), (1, 32, 32))
    art = art.with_module(build_model("digits-vmamba", checkpoint=CHECKPOINT), tmp_path / "w.safetensors")
    step = tmp_path / "step"
    step.mkdir()
    ctx = PassContext(splits=splits, profile=load_profile(profile), step_dir=step, history=[art])
    return make_pass("quantize", {"calibration_samples": 64, **options}).run(art, ctx), ctx.metrics


def test_onnx_static_quantizes_weights_and_leaves_the_scan_float(splits, tmp_path):
    import onnx

    out, metrics = run_pass({"format": "onnx", "mode": "static"}, splits, tmp_path)
    assert metrics["size_ratio"] >= 3.0 and metrics["accuracy_drop"] <= 1.0, metrics
    graph = onnx.load(str(out.path)).graph
    # shipped without the exporter's debug records: no shape records, short names
    assert not graph.value_info and max(len(n.name) for n in graph.node) <= 4
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    # every projection weight (x_proj on the MatMul's left, in/out_proj on its right) and the scan's A are int8
    matmul_weights = [dequantized.get(i) for n in graph.node if n.op_type == "MatMul" for i in n.input]
    assert sum(w in int8 for w in matmul_weights) == 8
    # the scan's exponentials see float inputs: no Q/DQ around elementwise math
    producers = {o: n.op_type for n in graph.node for o in n.output}
    exps = [n for n in graph.node if n.op_type == "Exp"]
    assert exps and all(producers.get(n.input[0]) != "DequantizeLinear" for n in exps)
    # weight-only int8 where ONNX Runtime has no integer kernel: x/dt projections (weight on the
    # MatMul's left) and the scan's `dt * A` keep float activations
    int8_weights = {out for out, src in dequantized.items() if src in int8}
    left = [n for n in graph.node if n.op_type == "MatMul" and n.input[0] in int8_weights]
    scaled = [n for n in graph.node if n.op_type == "Mul" and n.input[1] in int8_weights]
    assert len(left) == 4 and len(scaled) == 4  # x/dt projections and dt * A, chunk totals * A, per block
    activations = [n.input[1] for n in left] + [n.input[0] for n in scaled]
    assert all(producers.get(a) != "DequantizeLinear" for a in activations)
    floats = sum(np.prod(i.dims) * 4 for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert floats < 30_000  # what stays float: norms, biases, scales


def test_tflite_static_keeps_accuracy_with_weight_only_projections(splits, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    out, metrics = run_pass({"format": "tflite", "mode": "static"}, splits, tmp_path)
    assert metrics["size_ratio"] >= 2.4 and metrics["accuracy_drop"] <= 1.0, metrics
    interpreter = Interpreter(model_path=str(out.path))
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    # shipped without litert-torch's tensor names, but the model's input and output keep theirs
    io = {d["index"] for d in [*interpreter.get_input_details(), *interpreter.get_output_details()]}
    assert all(d["name"] for i, d in details.items() if i in io)
    assert not any(d["name"] for i, d in details.items() if i not in io)
    ops = interpreter._get_ops_details()
    by_output = {t: op for op in ops for t in op["outputs"]}
    computed = set(by_output) | {d["index"] for d in interpreter.get_input_details()}
    big_float_constants = [
        details[i]["name"] for op in ops for i in op["inputs"]
        if i >= 0 and i not in computed and details[i]["dtype"] == np.float32 and np.prod(details[i]["shape"]) >= 1024
    ]
    assert not big_float_constants  # projections, convs and the scan's A (stored twice) are all int8
    weight_lhs = []  # per BATCH_MATMUL: is its left operand an int8 weight (x_proj, dt_proj) or the scan's state
    for op in ops:
        if op["op_name"] == "BATCH_MATMUL":  # float activations; a weight is int8 dequantized at load
            assert all(details[i]["dtype"] == np.float32 for i in (*op["inputs"], *op["outputs"]))
            weight_lhs.append(by_output[op["inputs"][0]]["op_name"] == "DEQUANTIZE")
        if op["op_name"] == "FULLY_CONNECTED":
            assert details[op["inputs"][1]]["dtype"] == np.int8
    assert sorted(weight_lhs) == [False] * 2 + [True] * 4  # the two scan readouts stay float


@pytest.mark.parametrize(
    ("profile", "mode", "fmt", "mixed"),
    [("rpi5", "static", "auto", True), ("x86-cpu", "static", "auto", True), ("jetson-orin-nano", "fp16", "onnx", False),
     ("jetson-agx-orin", "fp16", "onnx", False)],
)
def test_mode_auto_follows_the_profile_precision(profile, mode, fmt, mixed):
    cfg = resolved(QuantizeConfig(mode="auto"), load_profile(profile))
    assert (cfg.mode, cfg.format, cfg.mixed_precision) == (mode, fmt, mixed)
    assert resolved(QuantizeConfig(mode="dynamic"), load_profile(profile)).mode == "dynamic"


def test_mode_auto_on_an_fp32_profile_is_a_one_line_error(splits, tmp_path, root):
    fp32_profile = tmp_path / "fp32-host.yaml"
    fp32_profile.write_text(
        (root / "profiles" / "x86-cpu.yaml").read_text().replace("name: x86-cpu", "name: fp32-host")
        .replace("default_precision: int8", "default_precision: fp32")
    )
    with pytest.raises(InputError, match="profile 'fp32-host' wants fp32.*drop the quantize pass") as err:
        run_pass({"mode": "auto"}, splits, tmp_path, profile=str(fp32_profile))
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "step").iterdir())
    with pytest.raises(InputError, match="fp16.*onnx only"):
        resolved(QuantizeConfig(format="tflite", mode="auto"), load_profile("jetson-orin-nano"))
