"""Fused CPU selective scan (numba): the eager backend "fused" of `edgeopt.ops.selective_scan`.

Why hand-written: no library ships a CPU selective scan (mamba-ssm's kernel is CUDA-only), and
the pure-PyTorch chunked scan is bound by memory traffic on its (B, D, L, N) decays and inputs.
This kernel makes one pass over L per (batch, channel): softplus, decays, recurrence, readout,
D skip and silu(z) gate work on per-channel buffers of L x N floats that stay in cache, and
channels run in parallel on torch's thread count. exp and softplus are written out as
polynomials because numba lowers math.exp to scalar libm calls (SIMD only with Intel's SVML,
never on ARM); these vectorize to AVX/NEON and are within 3e-7 relative of float64 over
[-87, 88] (tested), clamped outside it (e**-87 ~ 1.6e-38 stands in for 0 in the decays).
It is opaque to autograd and to tracers, so `fused_allowed` decides when it may run; training and
exported graphs keep the chunked formulation.
torch is imported only by the wrappers, so the kernel (`_scan`) imports with numpy and numba alone:
tests/test_scan_kernel_numpy.py runs it on an arm64 board that has no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

if TYPE_CHECKING:
    import torch

_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4)
# error_model="numpy": no ZeroDivisionError check, which would stop the loops vectorizing
_JIT = dict(cache=True, error_model="numpy")


@intrinsic
def _float_from_bits(typingctx, bits):
    """Reinterpret int32 bits as float32 (builds 2**k in `_exp` without a libm call)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_JIT)
def _exp(x):
    """float32 exp: 2**k * e**r, |r| <= ln2/2, degree-7 Taylor; clamped to [-87, 88] (keeps NaN)."""
    x = _F(-87.0) if x < _F(-87.0) else x
    x = _F(88.0) if x > _F(88.0) else x
    k = np.floor(x * _LOG2E + _F(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    p = _F(1 / 5040)
    for c in (_F(1 / 720), _F(1 / 120), _F(1 / 24), _F(1 / 6), _F(0.5), _F(1.0), _F(1.0)):
        p = p * r + c
    return p * _float_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(**_JIT)
def _softplus(x):
    """torch's softplus (x above 20 passes through): max(x, 0) + log1p(e), e = exp(-|x|) <= 1,
    with log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, as an odd series to s**15."""
    e = _exp(-abs(x))
    s = e / (_F(2.0) + e)
    s2 = s * s
    p = _F(1 / 15)
    for c in (_F(1 / 13), _F(1 / 11), _F(1 / 9), _F(1 / 7), _F(1 / 5), _F(1 / 3), _F(1.0)):
        p = p * s2 + c
    r = (x if x > _F(0.0) else _F(0.0)) + _F(2.0) * s * p
    return x if x > _F(20.0) else r


# reassoc lets the readout sum over N vectorize; _exp/_softplus are compiled without it
@njit(parallel=True, fastmath={"reassoc", "contract"}, **_JIT)
def _scan(u, delta, A, B, C, D, z, bias, softplus, out, states):
    """u, delta, z, out (Bt, D, L); A (D, N); B, C (Bt, G, L, N); D, bias (D,); states
    (Bt, D, L, N). Optional D/z/bias/states are passed with size 0."""
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    has_d, has_z, has_bias, want_states = D.size > 0, z.size > 0, bias.size > 0, states.size > 0
    for job in prange(batch * dim):
        b, d = job // dim, job % dim
        g = d // (dim // groups)
        uu, y = u[b, d], out[b, d]
        dt = np.empty(length, _F)
        du = np.empty(length, _F)
        decay = np.empty((length, nstate), _F)
        for t in range(length):
            x = delta[b, d, t] + bias[d] if has_bias else delta[b, d, t]
            x = _softplus(x) if softplus else x
            dt[t] = x
            du[t] = x * uu[t]
        a = A[d]
        if nstate == 1:  # one state: loops over L vectorize, the recurrence is scalar
            decay1, b1, c1 = decay.reshape(length), B[b, g].reshape(length), C[b, g].reshape(length)
            for t in range(length):
                decay1[t] = _exp(dt[t] * a[0])
            h1 = _F(0.0)
            for t in range(length):
                h1 = decay1[t] * h1 + du[t] * b1[t]
                y[t] = h1 * c1[t]
                if want_states:
                    states[b, d, t, 0] = h1
        else:  # loops over N vectorize
            for t in range(length):
                for n in range(nstate):
                    decay[t, n] = _exp(dt[t] * a[n])
            h = np.zeros(nstate, _F)
            for t in range(length):
                bt, ct = B[b, g, t], C[b, g, t]
                acc = _F(0.0)
                for n in range(nstate):
                    h[n] = decay[t, n] * h[n] + du[t] * bt[n]
                for n in range(nstate):
                    acc += h[n] * ct[n]
                y[t] = acc
                if want_states:
                    states[b, d, t] = h
        for t in range(length):
            v = y[t] + D[d] * uu[t] if has_d else y[t]
            if has_z:
                zt = z[b, d, t]
                v = v * zt / (_F(1.0) + _exp(-zt))
            y[t] = v


def fused_allowed(*tensors: torch.Tensor | None) -> bool:
    """True when the fused kernel may run: plain CPU tensors, no gradient wanted, and nothing
    tracing or transforming (jit, dynamo/torch.compile, torch.export and the ONNX/LiteRT
    exporters built on it, make_fx, vmap), whose fake or wrapped tensors and dispatch modes
    the kernel would bypass."""
    import torch
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    given = [t for t in tensors if t is not None]
    if (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or _get_current_dispatch_mode() is not None
        or torch._C._are_functorch_transforms_active()  # vmap, torch.func.grad
        or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0  # dual tensors look plain
    ):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in given):
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in given)


def fused_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    return_states: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out float32 (B, D, L), states float32 (B, D, L, N) or None); same arguments as selective_scan."""
    import torch

    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: u/delta (B, D, L) and A (D, N) expected, got {u.shape}, {delta.shape}, {A.shape}")
    Bg = B if B.dim() == 4 else B.unsqueeze(1)
    Cg = C if C.dim() == 4 else C.unsqueeze(1)
    if Bg.shape[1] == 0 or u.shape[1] % Bg.shape[1] or Bg.shape[1] != Cg.shape[1]:
        raise ValueError(f"selective_scan: {u.shape[1]} channels do not split into groups {Bg.shape[1]}/{Cg.shape[1]}")
    batch, dim, length = u.shape
    nstate = A.shape[1]
    # the kernel does not bounds-check, so every shape is checked here
    expected = {"B": (Bg, (batch, Bg.shape[1], nstate, length)), "C": (Cg, (batch, Bg.shape[1], nstate, length)),
                "z": (z, u.shape), "D": (D, (dim,)), "delta_bias": (delta_bias, (dim,))}  # fmt: skip
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    out = torch.empty(batch, dim, length)
    states = torch.empty(batch, dim, length, nstate) if return_states else torch.empty(0, 0, 0, 0)
    empty1, empty3 = np.empty(0, _F), np.empty((0, 0, 0), _F)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _scan(
        _array(u),
        _array(delta),
        _array(A),
        _array(Bg.transpose(2, 3)),
        _array(Cg.transpose(2, 3)),
        empty1 if D is None else _array(D),
        empty3 if z is None else _array(z),
        empty1 if delta_bias is None else _array(delta_bias),
        delta_softplus,
        out.numpy(),
        states.numpy(),
    )
    return out, (states if return_states else None)


def _array(t: torch.Tensor) -> np.ndarray:
    """C-contiguous float32 view (a copy only when dtype or layout differ)."""
    return t.detach().float().contiguous().numpy()
