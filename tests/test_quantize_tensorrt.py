"""TensorRT off the GPU: the one-line errors without TensorRT, and the host-side check of
what TensorRT can build (real onnxruntime quantizer outputs). Building and running engines
needs an NVIDIA GPU, which CI lacks: that path is untested on hardware."""

from __future__ import annotations

import re
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from profiler_fixtures import DigitsModel, digits_model  # noqa: F401  (fixture)

from edgeopt.errors import InputError
from edgeopt.exporters.tensorrt import build_engine, build_engine_from_model, run_engine
from edgeopt.profiler.bundle import check_tensorrt_onnx
from edgeopt.quantize import onnx_quant


@pytest.fixture
def no_tensorrt(monkeypatch):
    """TensorRT unimportable, even on a host that has it (None in sys.modules blocks the import)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _assert_install_hint(err: pytest.ExceptionInfo) -> None:
    message = str(err.value)
    assert "runtime 'tensorrt' is not installed" in message and "\n" not in message
    assert "python3-libnvinfer" in message and "pip install tensorrt" in message and "cuda-python" in message


def test_build_without_tensorrt_is_a_one_line_input_error(no_tensorrt, digits_model, tmp_path):  # noqa: F811
    with pytest.raises(InputError) as err:
        build_engine(digits_model.onnx_path, tmp_path / "m.engine", "fp16")
    _assert_install_hint(err)
    assert list(tmp_path.iterdir()) == []


def test_run_without_tensorrt_is_a_one_line_input_error(no_tensorrt, tmp_path):
    with pytest.raises(InputError) as err:
        run_engine(tmp_path / "m.engine", np.zeros((1, 4), np.float32))
    _assert_install_hint(err)


def test_export_from_model_without_tensorrt_fails_before_exporting(no_tensorrt, tmp_path):
    with pytest.raises(InputError) as err:
        build_engine_from_model(torch.nn.Linear(4, 2), torch.zeros(2, 4), tmp_path / "m.engine")
    _assert_install_hint(err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="supports fp32 and fp16, not int8"):
        build_engine_from_model(torch.nn.Linear(4, 2), torch.zeros(2, 4), tmp_path / "m.engine", "int8")


def _ort_static(fp32: str, out, calibration: np.ndarray, op_types: list[str], symmetric: bool = True) -> None:
    """onnxruntime's static QDQ int8; with symmetric activations it is the form TensorRT builds."""

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calibration[i : i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(fp32, str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})


def test_precision_follows_the_onnx_contents(digits_model, tmp_path):  # noqa: F811
    fp32 = digits_model.onnx_path
    fp16 = onnx_quant.convert_fp16(fp32, tmp_path / "fp16.onnx")
    int8 = tmp_path / "int8.onnx"
    _ort_static(str(fp32), int8, digits_model.eval_x[:256], ["MatMul"])
    assert check_tensorrt_onnx(fp32) == "fp32"
    assert check_tensorrt_onnx(fp16) == "fp16"
    assert check_tensorrt_onnx(int8) == "int8"
    assert check_tensorrt_onnx(int8, "mixed") == "mixed"
    assert check_tensorrt_onnx(fp32, "fp16") == "fp16"  # TensorRT's FP16 flag on an fp32 file is fine
    with pytest.raises(InputError, match="int8 TensorRT engines need a Q/DQ ONNX model"):
        check_tensorrt_onnx(fp16, "int8")
    with pytest.raises(InputError, match="has Q/DQ nodes, so TensorRT runs it as int8"):
        check_tensorrt_onnx(int8, "fp16")
    with pytest.raises(InputError, match="did you mean 'int8'"):
        check_tensorrt_onnx(fp32, "int4")


def test_asymmetric_activations_are_refused_with_the_way_out(digits_model, tmp_path):  # noqa: F811
    """The activation setting of edgeopt's static int8 (asymmetric, fine for onnxruntime) is not TensorRT's form."""
    out = tmp_path / "q.onnx"
    _ort_static(str(digits_model.onnx_path), out, digits_model.eval_x[:256], ["MatMul"], symmetric=False)
    with pytest.raises(InputError) as err:
        check_tensorrt_onnx(out, "int8")
    message = str(err.value)
    assert "only symmetric int8 Q/DQ" in message and "quantize pass does so for a Jetson profile" in message
    assert re.search(r"QuantizeLinear #\d+ \(into (MatMul|Add)\)", message) and "\n" not in message


def test_edgeopt_static_int8_for_tensorrt_is_buildable(digits_model, tmp_path):  # noqa: F811
    """What the quantize pass makes for a Jetson profile passes the check; its default (ORT's) form does not."""
    from edgeopt.exporters.onnx import export_onnx

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    fp32 = export_onnx(mlp, torch.zeros(2, 64), tmp_path / "fp32.onnx", keep_metadata=True)
    calibration = digits_model.eval_x[:256]
    for_trt = onnx_quant.quantize_static(fp32, calibration, tmp_path / "trt.onnx", symmetric_activations=True)
    assert check_tensorrt_onnx(for_trt) == "int8"
    for_ort = onnx_quant.quantize_static(fp32, calibration, tmp_path / "ort.onnx")
    with pytest.raises(InputError, match="only symmetric int8"):
        check_tensorrt_onnx(for_ort)


def test_dynamic_int8_is_refused(digits_model, tmp_path):  # noqa: F811
    out = onnx_quant.quantize_dynamic(digits_model.onnx_path, tmp_path / "dyn.onnx")
    with pytest.raises(InputError, match=r"integer int8 ops \(.*MatMulInteger.*\)"):
        check_tensorrt_onnx(out)


def test_int32_bias_is_refused(digits_model, tmp_path):  # noqa: F811
    """onnxruntime quantizes a Gemm's bias to int32 by default; TensorRT takes int8 Q/DQ only."""
    m = digits_model
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="fc")], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(m.weight, "W"), numpy_helper.from_array(m.bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "gemm.onnx")
    _ort_static(str(tmp_path / "gemm.onnx"), tmp_path / "gemm_q.onnx", m.eval_x[:256], ["Gemm"])
    with pytest.raises(InputError, match=r"DequantizeLinear #\d+ \(into Gemm\) holds an int32-quantized bias.* QuantizeBias: False"):
        check_tensorrt_onnx(tmp_path / "gemm_q.onnx")


def test_dynamic_feature_dimension_is_refused(digits_model, tmp_path):  # noqa: F811
    model = onnx.load(digits_model.onnx_path)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    onnx.save(model, tmp_path / "dyn_dims.onnx")
    with pytest.raises(InputError, match="input 'x' is dynamic beyond the batch dimension"):
        check_tensorrt_onnx(tmp_path / "dyn_dims.onnx")


def test_cli_export_tensorrt_without_tensorrt_is_exit_2_one_line(no_tensorrt, cli_runner, root, tmp_path):
    import yaml

    from edgeopt.cli import cli

    recipe = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    recipe["model"]["checkpoint"] = str(root / recipe["model"]["checkpoint"])  # any working directory
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "m.engine"
    result = cli_runner.invoke(cli, ["export", str(tmp_path / "recipe.yaml"), "--format", "tensorrt",
                                     "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "runtime 'tensorrt' is not installed" in lines[0], result.stderr
    assert not out.exists()
