"""Expert compute from stored bytes: fp16 and int4 SwiGLU experts through `libedgeopt_moe.so`.

A decoded token multiplies each expert matrix by one vector, so its cost is the weight's bytes.
PyTorch on CPU can only upcast an fp16 matrix to fp32 first (5x the bytes moved; 1.13 vs 0.56 ms per
expert of the 2 GB scale model, cold) and runs int4 through a kernel that rounds activations to
bf16. The C kernels (edgeopt/ops/csrc/moe_experts.cpp) read each weight once in its stored precision
and keep fp32 activations and sums, so results equal the upcast reference up to summation order.

The library is built by `make setup` (`python -m edgeopt.ops.build_kernels`) and, if missing, on first
use here (~1 s of g++); without a compiler the engine keeps the PyTorch path, warning once.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.moe.quant import QuantizedWeight

MAX_TOKENS = 8  # beyond this (a prefill) an upcast + GEMM reuses each weight better than per-row dots
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    from edgeopt.ops.build_kernels import BuildError, build_moe, find_moe_library

    try:
        path = find_moe_library() or build_moe()
        lib = ctypes.CDLL(str(path))
    except (BuildError, OSError) as error:
        warnings.warn(f"MoE expert kernels unavailable, experts compute through PyTorch (slower): {error}", stacklevel=2)
        return None
    lib.edgeopt_swiglu_f16.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _I64]
    lib.edgeopt_swiglu_q4.argtypes = [_P, _P, _P, _I64, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64]
    lib.edgeopt_linear_bf16.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64]
    for fn in (lib.edgeopt_swiglu_f16, lib.edgeopt_swiglu_q4, lib.edgeopt_linear_bf16):
        fn.restype = None
    return lib


def available() -> bool:
    return library() is not None


def _shape(m) -> tuple[int, int]:
    """(out, in) of a dense or quantized matrix."""
    return tuple(m.shape) if isinstance(m, torch.Tensor) else (m.codes.shape[0], m.codes.shape[1] * m.codes.shape[2] * 2)


def prepare(gate_up, down) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function computing down(silu(gate(x)) * up(x)) for x (tokens <= MAX_TOKENS, H) fp32 from fp16
    tensors or int4 `QuantizedWeight`s, with shapes checked and pointers bound once (an expert in the
    cache runs many times; per-call Python work was ~40 us against a 60 us kernel on moe-lm); None where
    the kernels do not apply (other precisions, no library)."""
    dense = isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    if dense and not (gate_up.dtype == down.dtype == torch.float16):
        return None
    if not dense and not (isinstance(gate_up, QuantizedWeight) and isinstance(down, QuantizedWeight)
                          and gate_up.bits == down.bits == 4):
        return None
    hidden, inter = _shape(down)
    if _shape(gate_up) != (2 * inter, hidden):
        return None
    lib = library()
    if lib is None:
        return None
    if dense:
        held = [gate_up.contiguous(), down.contiguous()]
        fn, args = lib.edgeopt_swiglu_f16, [t.data_ptr() for t in held]
    else:
        held, args = [], []
        for m in (gate_up, down):
            parts = [m.codes.contiguous(), m.scale.contiguous(), m.zero.contiguous()]
            held += parts
            args += [*(t.data_ptr() for t in parts), m.codes.shape[2] * 2]
        fn = lib.edgeopt_swiglu_q4

    def run(x: torch.Tensor, _held=held) -> torch.Tensor:  # _held keeps the weights alive with the closure
        tokens = x.shape[0]
        x = x.contiguous()
        y = torch.empty(tokens, hidden)
        tmp = torch.empty(tokens, 2 * inter)
        fn(*args, x.data_ptr(), y.data_ptr(), tmp.data_ptr(), tokens, hidden, inter)
        return y

    return run


def applies(x: torch.Tensor, hidden: int) -> bool:
    """Whether an input is one the kernels take: fp32 (tokens, hidden) of a decode step or a short prompt."""
    return x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= MAX_TOKENS and x.shape[1] == hidden


class CompactLinear(nn.Module):
    """An `nn.Linear` of a bf16 checkpoint held in bf16: decode steps multiply it with the bf16 kernel
    (bf16 -> fp32 is exact, so the result is the fp32 model's up to summation order) and read half the
    bytes (the scale model's fp32 LM head alone was 131 MB per token); longer inputs upcast per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        lib = library()
        if lib is None or flat.dtype != torch.float32 or flat.shape[0] > MAX_TOKENS:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = flat.contiguous()
        y = torch.empty(flat.shape[0], self.out_features)
        lib.edgeopt_linear_bf16(self.weight.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                                flat.data_ptr(), y.data_ptr(), flat.shape[0], self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)


def compact_linears(model: nn.Module, bf16_names: set[str]) -> int:
    """Replace every `nn.Linear` whose checkpoint weight was bf16 by a `CompactLinear` (not routers, which
    the engine reads as fp32 matrices, nor weights shared with another module); returns how many."""
    if library() is None:
        return 0
    shared = _shared_ids(model)
    swapped = 0
    for name, module in list(model.named_modules()):
        if (type(module) is not nn.Linear or f"{name}.weight" not in bf16_names or name.rsplit(".", 1)[-1] == "gate"
                or id(module.weight) in shared):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CompactLinear(module.weight.detach(), module.bias))
        swapped += 1
    return swapped


def _shared_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, count in seen.items() if count > 1}
