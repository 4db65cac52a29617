"""Mamba's selective scan with five backends: reference loop, chunked (export/training),
fused CPU kernel (eager inference, `edgeopt.ops.scan_kernel`), CUDA kernel, and "op": one
`torch.ops.edgeopt.selective_scan` node that ExecuTorch runs with a C++ kernel
(`edgeopt.ops.scan_op`; exporters select it with `default_backend("op")`).

Semantics are mamba-ssm's `selective_scan_ref`. Shapes: u, delta, z (B, D, L); A (D, N);
B, C (B, N, L) or grouped (B, G, N, L) where channel d uses group d // (D // G); D, delta_bias (D,)::

    delta = softplus(delta + delta_bias)          (softplus only if delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (B, D, N)
    y_t   = <h_t, C_t> + D * u_t,   out = y * silu(z)

Why a hand-written chunked scan: the CUDA kernel cannot be traced or exported, and a plain
per-token loop unrolls L (3,136 at 56x56) steps into the graph. The chunked backend splits L
into NC chunks of T ~ sqrt(L) tokens and runs the recurrence for all chunks at once, so the
graph holds O(sqrt(L)) steps: pass 1 finds each chunk's end state from a zero start, a short
loop over chunks carries the true start state, pass 2 reruns the chunks from their true
start states and reads out y. Every step multiplies by decays <= 1, so it is as stable as
the loop (no exp of positive cumulative sums), and every op works on cache-sized slices.
Cost: about 2x the loop's arithmetic for ~sqrt(L) sequential steps instead of L. Layout is
token-major (B, NC, T, D, N); long scans compute each step's decays and inputs when the step
runs (`_chunked_tokens`), short ones all at once (`_chunked_small`, fewer graph nodes).

That memory traffic bounds the chunked scan in eager mode, so eager CPU inference (no
autograd, nothing tracing or exporting) runs the fused numba kernel instead: one pass over L
per channel with the state in cache. It is opaque to autograd and tracers, so training and
every exported graph (ONNX, TFLite, torch.export) keep the chunked formulation.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from functools import lru_cache
from types import ModuleType

import torch
import torch.nn.functional as F

from edgeopt.errors import unknown_name

BACKENDS = ("reference", "chunked", "fused", "cuda", "op")
# the backend a call without an explicit one gets; an exporter sets it for the graph it traces
_DEFAULT_BACKEND: ContextVar[str | None] = ContextVar("edgeopt_scan_backend", default=None)
# elements of one sample's (D, L, N) up to which all steps are computed at once; the batch size
# stays out of the decision so an export with a dynamic batch does not guard on it
_VECTORIZE_MAX = 1 << 22


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_states: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan; with `return_states` also every hidden state, (B, D, L, N) float32.

    `backend=None` picks "cuda" for CUDA tensors when mamba_ssm is importable (and no states
    are requested; the kernel does not return them), "fused" for eager CPU inference (no
    autograd, nothing tracing or exporting), else "chunked" (training and exported graphs).
    """
    backend = backend or _DEFAULT_BACKEND.get()
    if backend == "op":
        if return_states:
            raise ValueError("the scan op does not return hidden states; use backend='chunked'")
        from edgeopt.ops.scan_op import scan_node

        return scan_node(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    kernel = _fused_kernel() if backend in (None, "fused") else None
    if backend is None:
        if u.is_cuda and not return_states and _mamba_kernel() is not None:
            backend = "cuda"
        else:
            backend = "fused" if kernel is not None and kernel.fused_allowed(*tensors) else "chunked"
    elif backend == "fused":
        if kernel is None:
            raise ValueError("the fused kernel could not be loaded (see the warning); use backend='chunked'")
        if not kernel.fused_allowed(*tensors):
            raise ValueError("the fused kernel runs only on CPU without autograd or tracing; use backend='chunked'")
    if backend not in BACKENDS:
        raise unknown_name("selective-scan backend", backend, BACKENDS)
    if backend == "fused":
        out, states = kernel.fused_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_states)
        return (out.to(u.dtype), states) if return_states else out.to(u.dtype)
    if backend == "cuda":
        if return_states:
            raise ValueError("the CUDA kernel does not return hidden states; use backend='chunked'")
        return _cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = u.dtype
    u, delta, Bg, Cg = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, reference=backend == "reference")
    scan = _reference if backend == "reference" else _chunked
    y, states = scan(u, delta, A.float(), Bg, Cg, return_states)
    out = _finish(y, u, D, z).to(dtype)
    return (out, states) if return_states else out


def active_backend(backend: str | None = None) -> str | None:
    """The backend a call naming `backend` (None: the `default_backend` in force) dispatches to,
    before the automatic choice; modules ask it to build the graph the backend runs best."""
    return backend or _DEFAULT_BACKEND.get()


@contextlib.contextmanager
def default_backend(backend: str | None) -> Iterator[None]:
    """Within the block, calls that name no backend use `backend` (e.g. "op" while the ExecuTorch
    exporter traces a model, so every SS2D becomes one scan node); modules need no flag."""
    if backend is not None and backend not in BACKENDS:
        raise unknown_name("selective-scan backend", backend, BACKENDS)
    token = _DEFAULT_BACKEND.set(backend)
    try:
        yield
    finally:
        _DEFAULT_BACKEND.reset(token)


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 inputs, delta made positive, B/C as (B, G, N, L). The oracle keeps torch's softplus."""
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: u/delta (B, D, L) and A (D, N) expected, got {u.shape}, {delta.shape}, {A.shape}")
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta) if reference else softplus(delta)
    Bg = B.float() if B.dim() == 4 else B.float().unsqueeze(1)
    Cg = C.float() if C.dim() == 4 else C.float().unsqueeze(1)
    if u.shape[1] % Bg.shape[1] or Bg.shape[1] != Cg.shape[1]:
        raise ValueError(f"selective_scan: {u.shape[1]} channels do not split into groups {Bg.shape[1]}/{Cg.shape[1]}")
    return u, delta, Bg, Cg


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x). Exported graphs get it written out: ONNX Runtime's Softplus (plus the
    threshold Where) is ~5x slower than these elementwise ops; eager keeps torch's fused kernel."""
    if torch.compiler.is_exporting():
        return torch.relu(x) + torch.log1p(torch.exp(-x.abs()))
    return F.softplus(x)


def _finish(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _reference(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, want_states: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-token loop of mamba-ssm's `selective_scan_ref`: the oracle, never exported."""
    groups = B.shape[1]
    Bx = B.repeat_interleave(u.shape[1] // groups, dim=1)  # (B, D, N, L)
    Cx = C.repeat_interleave(u.shape[1] // groups, dim=1)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bx, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys, hs = [], []
    for i in range(u.shape[2]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, Cx[:, :, :, i]))
        if want_states:
            hs.append(h)
    return torch.stack(ys, dim=2), (torch.stack(hs, dim=2) if want_states else None)


def chunk_size(length: int) -> int:
    """Tokens per chunk: ~sqrt(L) balances the two short loops (graph size and eager speed)."""
    return max(1, math.ceil(math.sqrt(length)))


def _chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    want_states: bool,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two-pass chunked recurrence (see module docstring). Shapes are static, so it traces."""
    dim, length, nstate = u.shape[1], u.shape[2], A.shape[1]
    T = chunk or chunk_size(length)
    NC = -(-length // T)
    pad = NC * T - length
    if pad:  # padded steps have delta = 0: decay 1, input 0, so they change nothing before them
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    if dim * NC * T * nstate <= _VECTORIZE_MAX:
        return _chunked_small(u, delta, A, B, C, want_states, T, length)
    return _chunked_tokens(u, delta, A, B, C, want_states, T, length)


def _chunked_tokens(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    want_states: bool,
    T: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked scan for long sequences, token-major and per step.

    Layout (B, NC, T, D, N) as `_chunked_small`, but a step's decays and inputs are computed when
    the step runs, in both passes, so no (B, D, L, N) tensor is held across the passes: peak memory
    is a few (B, NC, D, N) step tensors instead of two full decay/input tensors (2 x 154 MB at
    VMamba-T's first stage), for twice the exps. The readout is one batched MatMul per step.
    """
    _, dim, padded = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    dg, NC = dim // groups, padded // T
    # every tensor stays at most 5-D (LiteRT slices at most 5-D)
    dt = delta.transpose(1, 2).reshape(-1, NC, T, dim, 1)  # (B, NC, T, D, 1)
    du = (delta * u).transpose(1, 2).reshape(-1, NC, T, dim)
    Bt = B.permute(0, 3, 1, 2).reshape(-1, NC, T, groups, nstate)
    Ct = C.permute(0, 3, 1, 2).reshape(-1, NC, T, groups, nstate)
    dts, dus, Bs, Cs = dt.unbind(2), du.unbind(2), Bt.unbind(2), [c.unsqueeze(-1) for c in Ct.unbind(2)]

    def decay(t: int) -> torch.Tensor:  # (B, NC, D, N)
        return torch.exp(dts[t] * A)

    def step_input(t: int) -> torch.Tensor:
        return (dus[t].reshape(-1, NC, groups, dg, 1) * Bs[t].unsqueeze(3)).reshape(-1, NC, dim, nstate)

    h = None
    if NC > 1:  # pass 1 (chunk end states from a zero start), then carry the true start states
        h = step_input(0)
        for t in range(1, T):
            h = torch.addcmul(step_input(t), decay(t), h)
        ends, totals = h.split(1, 1), torch.exp(dt.sum(2) * A).split(1, 1)
        starts = [ends[0]]  # the state entering chunk c + 1
        for c in range(1, NC - 1):
            starts.append(torch.addcmul(ends[c], totals[c], starts[-1]))
        h = F.pad(torch.cat(starts, dim=1), (0, 0, 0, 0, 1, 0))  # chunk 0 starts from zero
    ys, hs = [], []
    for t in range(T):
        h = step_input(t) if h is None else torch.addcmul(step_input(t), decay(t), h)
        ys.append(torch.matmul(h.reshape(-1, NC, groups, dg, nstate), Cs[t]).reshape(-1, NC, dim))
        if want_states:
            hs.append(h)
    y = torch.stack(ys, dim=2).reshape(-1, padded, dim).transpose(1, 2)[:, :, :length]
    states = torch.stack(hs, dim=2).reshape(-1, padded, dim, nstate).transpose(1, 2)[:, :, :length] if want_states else None
    return y, states


def _chunked_small(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    want_states: bool,
    T: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked scan with few graph nodes, for scans whose (D, L, N) fits in cache.

    Exported graphs pay per node (runtime dispatch, and every node's tensors and constants are
    bytes in the file), so this form computes all steps' decays and inputs in one op each, starts
    pass 1 from the first step's input and pass 2 from the carried states (no zero tensors, which
    a dynamic-batch export builds from the input's shape), and reads out y once for all steps.
    Layout (B, NC, T, D, N), token-major: a step's slice is one contiguous block, the tensor stays
    5-D (LiteRT slices at most 5-D), and the readout y_l = h_l C_l is one batched MatMul over
    (B, L, G) instead of a broadcast Mul and a ReduceSum over N (onnxruntime 1.44x, LiteRT 1.27x
    faster on digits-vmamba); only the (B, L, D) operands are transposed. Inputs are padded to NC * T.
    """
    _, dim, padded = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    dg, NC = dim // groups, padded // T
    dt = delta.transpose(1, 2)  # (B, L, D)
    dt5 = dt.reshape(-1, NC, T, dim, 1)
    decays = torch.exp(dt5 * A).split(1, 2)
    Bt = B.permute(0, 3, 1, 2).unsqueeze(3)  # (B, L, G, 1, N)
    du = (dt * u.transpose(1, 2)).reshape(-1, padded, groups, dg, 1)
    inputs = (du * Bt).reshape(-1, NC, T, dim, nstate).split(1, 2)
    h = None
    if NC > 1:  # pass 1 (chunk end states from a zero start), then carry the true start states
        h = inputs[0]
        for t in range(1, T):
            h = torch.addcmul(inputs[t], decays[t], h)
        ends, totals = h.split(1, 1), torch.exp(dt5.sum(2, keepdim=True) * A).split(1, 1)
        starts = [ends[0]]  # the state entering chunk c + 1
        for c in range(1, NC - 1):
            starts.append(torch.addcmul(ends[c], totals[c], starts[-1]))
        h = F.pad(torch.cat(starts, dim=1), (0, 0, 0, 0, 0, 0, 1, 0))  # chunk 0 starts from zero
    hs = []
    for t in range(T):
        h = inputs[t] if h is None else torch.addcmul(inputs[t], decays[t], h)
        hs.append(h)
    h = torch.cat(hs, dim=2).reshape(-1, padded, dim, nstate)  # (B, L, D, N)
    Ct = C.permute(0, 3, 1, 2).unsqueeze(-1)  # (B, L, G, N, 1)
    y = torch.matmul(h.reshape(-1, padded, groups, dg, nstate), Ct).reshape(-1, padded, dim)
    y = y.transpose(1, 2)[:, :, :length]
    states = h.transpose(1, 2)[:, :, :length] if want_states else None
    return y, states


@lru_cache(maxsize=1)
def _fused_kernel() -> ModuleType | None:
    """The numba kernel module, imported on first use; None (with a warning) where numba cannot
    load or cannot cache it (e.g. read-only install and home), so training and export, which
    never use it, keep working and eager inference falls back to the chunked scan."""
    try:
        from edgeopt.ops import scan_kernel
    except (ImportError, RuntimeError) as error:
        warnings.warn(f"fused selective scan unavailable, using the chunked scan: {error}", stacklevel=3)
        return None
    return scan_kernel


@lru_cache(maxsize=1)
def _mamba_kernel():
    """mamba-ssm's fused kernel (optional extra `edgeopt[cuda]`), imported only when first needed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA build
        return None
    return selective_scan_fn


def _cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> torch.Tensor:
    """Thin dispatch to mamba-ssm's kernel; it takes the same arguments and semantics."""
    kernel = _mamba_kernel()
    if kernel is None or not u.is_cuda:
        raise ValueError("backend 'cuda' needs CUDA tensors and mamba_ssm (pip install 'edgeopt[cuda]')")
    return kernel(u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias, delta_softplus)
