"""The C expert kernels (edgeopt/ops/csrc/moe_experts.cpp) against PyTorch's upcast/dequantize math."""

from __future__ import annotations

import pytest
import torch

from edgeopt.models.moe import swiglu_expert
from edgeopt.moe import kernels
from edgeopt.moe.quant import QuantSpec, quantize
from edgeopt.moe.store import LoadedExpert

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the expert kernels")


def _swiglu(x: torch.Tensor, gate_up, down) -> torch.Tensor | None:
    """The kernels on one input as `LoadedExpert.forward` uses them; None where they do not apply."""
    run = kernels.prepare(gate_up, down)
    hidden = down.shape[0] if isinstance(down, torch.Tensor) else down.codes.shape[0]
    return run(x) if run is not None and kernels.applies(x, hidden) else None


def _expert(hidden: int, inter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * inter, hidden, generator=g) * 0.05, torch.randn(hidden, inter, generator=g) * 0.05


# widths that hit the vectorized bodies (multiples of 64), their remainders, and small groups (int4 for_width)
SHAPES = [(1024, 768), (96, 160), (40, 24), (130, 70)]


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, kernels.MAX_TOKENS])
def test_fp16_expert_equals_the_upcast_reference(hidden, inter, tokens):
    gate_up, down = (m.half() for m in _expert(hidden, inter, hidden + inter))
    x = torch.randn(tokens, hidden)
    want = swiglu_expert(x, gate_up.float(), down.float())
    got = _swiglu(x, gate_up, down)
    assert got is not None and got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_int4_expert_equals_the_dequantized_reference(hidden, inter, tokens):
    gate_up, down = _expert(hidden, inter, 7 * hidden + inter)
    q_gu, q_d = (quantize(m, QuantSpec(4, 64)) for m in (gate_up, down))
    x = torch.randn(tokens, hidden)
    want = swiglu_expert(x, q_gu.dequantize(), q_d.dequantize())
    got = _swiglu(x, q_gu, q_d)
    assert got is not None
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_kernels_decline_what_they_do_not_compute():
    gate_up, down = _expert(64, 32, 0)
    x = torch.randn(1, 64)
    assert _swiglu(x, gate_up, down) is None  # fp32 weights: PyTorch's own GEMV
    q2 = [quantize(m, QuantSpec(2, 32)) for m in (gate_up, down)]
    assert _swiglu(x, *q2) is None  # int2
    assert _swiglu(torch.randn(kernels.MAX_TOKENS + 1, 64), gate_up.half(), down.half()) is None  # prefill
    assert _swiglu(torch.randn(1, 32), gate_up.half(), down.half()) is None  # wrong width


def test_loaded_expert_gives_the_same_output_with_and_without_the_kernels(monkeypatch):
    gate_up, down = _expert(96, 160, 3)
    x = torch.randn(2, 96)
    entries = [LoadedExpert("fp16", gate_up.half(), down.half(), 0),
               LoadedExpert("int4", quantize(gate_up, QuantSpec(4, 32)), quantize(down, QuantSpec(4, 32)), 0)]
    fast = [e.forward(x) for e in entries]
    monkeypatch.setattr(kernels, "library", lambda: None)
    slow = [e.forward(x) for e in entries]
    for f, s in zip(fast, slow, strict=True):
        assert (f - s).abs().max() <= 1e-5 * s.abs().max()


def test_library_is_rebuilt_when_its_source_changes(tmp_path):
    import json

    from edgeopt.ops import build_kernels

    path = build_kernels.build_moe(tmp_path)
    assert build_kernels.find_moe_library(tmp_path) == path
    stamp = tmp_path / f"{build_kernels.MOE_LIBRARY}.json"
    stamp.write_text(json.dumps(dict(json.loads(stamp.read_text()), source_sha256="0" * 64)))
    assert build_kernels.find_moe_library(tmp_path) is None


def test_store_in_the_old_int4_layout_is_refused_in_one_line(tmp_path):
    import json

    from edgeopt.errors import InputError
    from edgeopt.moe.store import ExpertStore, write_store

    gate_up, down = _expert(64, 32, 1)
    write_store(tmp_path / "s", [[(gate_up, down)]], {}, {"kind": "test"}, ("fp16", "int4"))
    manifest = tmp_path / "s" / "store.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), int4_layout="aten-int4pack-cpu")))
    with pytest.raises(InputError, match="re-pack") as err:
        ExpertStore(tmp_path / "s")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 4, kernels.MAX_TOKENS + 3])
def test_bf16_linear_equals_the_fp32_model(bias, tokens):
    """A bf16 checkpoint's linear held in bf16 gives what the fp32-materialized model gives."""
    weight = (torch.randn(301, 200) * 0.05).bfloat16()
    b = torch.randn(301) if bias else None
    x = torch.randn(2, tokens, 200)
    want = torch.nn.functional.linear(x, weight.float(), b)
    got = kernels.CompactLinear(weight, b)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_compact_linears_swaps_bf16_linears_but_not_routers_or_shared_weights():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.gate, self.head = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
            self.embed = torch.nn.Embedding(8, 8)
            self.head.weight = self.embed.weight  # tied

    model = Block()
    names = {"q_proj.weight", "gate.weight", "head.weight", "embed.weight"}
    assert kernels.compact_linears(model, names) == 1
    assert isinstance(model.q_proj, kernels.CompactLinear) and model.q_proj.weight.dtype == torch.bfloat16
    assert type(model.gate) is torch.nn.Linear and type(model.head) is torch.nn.Linear
    assert kernels.compact_linears(Block(), set()) == 0  # fp32 checkpoints stay fp32


def test_materialize_never_holds_bf16_linears_in_fp32():
    """A store whose resident linears are bf16 fills CompactLinears directly (no fp32 copy ever allocated)
    and computes what the fp32 model computes."""
    from edgeopt.moe.models import materialize

    state = {"0.weight": (torch.randn(16, 8) * 0.1).bfloat16(), "0.bias": torch.randn(16),
             "2.weight": torch.randn(4, 16).bfloat16(), "2.bias": torch.randn(4)}
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    materialize(model, state)
    assert all(isinstance(model[i], kernels.CompactLinear) and model[i].weight.dtype == torch.bfloat16 for i in (0, 2))
    assert not [p for p in model.parameters()]  # nothing left in fp32
    x = torch.randn(3, 8)
    h = torch.nn.functional.silu(torch.nn.functional.linear(x, state["0.weight"].float(), state["0.bias"]))
    want = torch.nn.functional.linear(h, state["2.weight"].float(), state["2.bias"])
    assert (model(x) - want).abs().max() <= 1e-5 * want.abs().max()
