"""Quantized graphs the runtime itself refuses: avoided where we know why, named where we don't."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeopt.evaluate import parity, run_tflite
from edgeopt.exporters.tflite import export_tflite
from edgeopt.quantize import quantizable_layers, tflite_quant
from edgeopt.quantize.op_location import runtime_rejection


class WeightLeftEinsum(nn.Module):
    """SS2D's x_proj: einsum("bkdl,kcd->bkcl") with the weight as the matmul's *left* operand."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkdl,kcd->bkcl", x, self.weight)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 4 * 16 * 8)
        self.mix = WeightLeftEinsum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(x.flatten(1)).reshape(-1, 4, 16, 8)).flatten(1)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    path = export_tflite(model, torch.zeros(1, 64), tmp_path_factory.mktemp("rt") / "fp32.tflite", keep_metadata=True)
    return model, path


def test_layers_include_modules_that_own_a_weight_matrix(fp32):
    assert quantizable_layers(fp32[0]) == ["embed", "mix"]


def test_dynamic_int8_skips_weight_left_batch_matmul_and_runs(fp32, tmp_path):
    model, path = fp32
    assert len(tflite_quant.const_lhs_matmuls(path)) == 1
    out = tflite_quant.quantize_dynamic(path, tmp_path / "dyn.tflite")
    x = torch.randn(16, 64)
    figures = parity(model(x).detach().numpy(), run_tflite(out, x.numpy()))
    assert figures["cosine"] > 0.999
    assert out.stat().st_size < 0.4 * path.stat().st_size  # embed's 33k weights still int8


def test_runtime_rejection_names_op_and_module(fp32, tmp_path):
    """ai-edge-quantizer's plain dynamic recipe int8s that left operand; LiteRT refuses the result."""
    from ai_edge_quantizer import quantizer, recipe

    model, path = fp32
    q = quantizer.Quantizer(str(path), recipe.dynamic_wi8_afp32())
    raw = tmp_path / "raw.tflite"
    raw.write_bytes(q.quantize(enable_progress_report=False).quantized_model)
    with pytest.raises(RuntimeError) as err:
        run_tflite(raw, np.zeros((1, 64), np.float32))
    message = runtime_rejection("tflite", raw, err.value, [n for n, _ in model.named_modules() if n])
    assert "rejects op BATCH_MATMUL" in message and "in module 'mix'" in message
    assert "keep_float: ['mix']" in message and "\n" not in message


def test_module_paths_match_litert_tensor_names_through_module_lists():
    import re

    from edgeopt.quantize.tflite_quant import module_regex, tensor_module

    # `layers` is a ModuleList: never called, so litert-torch's name has no `_layers` scope
    name = (
        "m.VMamba/torch.nn.modules.container.Sequential_0/torch.nn.modules.container.Sequential_blocks/"
        "m.VSSBlock_0/m.SS2D_op;21"
    )
    assert re.search(module_regex("layers.0.blocks.0.op"), name)
    assert not re.search(module_regex("layers.1.blocks.0.op"), name)
    assert not re.search(module_regex("layers.0.blocks.0.op.in_proj"), name)
    modules = ["layers.0.blocks.0", "layers.0.blocks.0.op", "layers.0.blocks.0.op.in_proj"]
    assert tensor_module(name, modules) == "layers.0.blocks.0.op"
    fused = "m.Net/torch.nn.modules.activation.ReLU_1;;m.Net/torch.nn.modules.linear.Linear_fc;"
    assert tensor_module(fused, ["fc", "head.fc"]) == "fc"
