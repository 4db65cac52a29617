"""Every selective-scan backend agrees with the reference loop (mamba-ssm semantics), and the
default picks the fused kernel only where it is safe (eager CPU inference)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.errors import InputError
from edgeopt.ops import selective_scan
from edgeopt.ops.selective_scan import _chunked, _prepare

scan_module = sys.modules["edgeopt.ops.selective_scan"]


def _inputs(batch, dim, length, nstate, groups, seed=0, grouped=True):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(batch, groups, nstate, length, generator=g)
    C = torch.randn(batch, groups, nstate, length, generator=g)
    if not grouped:
        B, C = B[:, 0], C[:, 0]
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) - 1.0,
        A=-torch.exp(torch.randn(dim, nstate, generator=g)),
        B=B,
        C=C,
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.5,
    )


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6)


CASES = [  # batch, dim, length, nstate, groups, grouped B/C
    (2, 8, 37, 16, 1, False),
    (1, 12, 50, 1, 3, True),
    (2, 16, 64, 16, 4, True),
    (1, 6, 1, 4, 2, True),
    (3, 4, 200, 1, 1, False),
]


@pytest.mark.parametrize("batch,dim,length,nstate,groups,grouped", CASES)
@pytest.mark.parametrize("with_z_bias", [True, False])
@pytest.mark.parametrize("backend", ["chunked", "fused"])
def test_backend_matches_reference(batch, dim, length, nstate, groups, grouped, with_z_bias, backend):
    kw = _inputs(batch, dim, length, nstate, groups, seed=length, grouped=grouped)
    if not with_z_bias:
        kw.update(z=None, delta_bias=None, D=None)
    want, want_h = selective_scan(**kw, delta_softplus=True, return_states=True, backend="reference")
    got, got_h = selective_scan(**kw, delta_softplus=True, return_states=True, backend=backend)
    assert got.shape == (batch, dim, length) and got_h.shape == (batch, dim, length, nstate)
    if backend == "fused":  # same per-step arithmetic as the loop, in one pass: float32 round-off only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5 * float(want_h.abs().max()))
    _close(got, want)
    _close(got_h, want_h)
    assert torch.equal(selective_scan(**kw, delta_softplus=True, backend=backend), got)  # states change nothing


@pytest.mark.parametrize("softplus", [True, False])
def test_fused_extreme_deltas(softplus):
    """Large |delta| (softplus threshold 20, decays that underflow) and no softplus at all."""
    kw = _inputs(1, 8, 60, 16, 2, seed=3)
    kw["delta"] = torch.linspace(-40, 40, 60).expand(1, 8, 60).contiguous()
    if not softplus:
        kw["delta"] = kw["delta"].abs() / 4
    want = selective_scan(**kw, delta_softplus=softplus, backend="reference")
    got = selective_scan(**kw, delta_softplus=softplus, backend="fused")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_inputs(dtype):
    kw = _inputs(2, 8, 40, 16, 2)
    half = {k: v.to(dtype) for k, v in kw.items()}
    want = selective_scan(**{k: v.float() for k, v in half.items()}, delta_softplus=True, backend="reference")
    got = selective_scan(**half, delta_softplus=True, backend="fused")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_fused_is_the_same_on_any_thread_count():
    kw = _inputs(2, 16, 50, 16, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = selective_scan(**kw, delta_softplus=True, backend="fused")
        torch.set_num_threads(2)
        two = selective_scan(**kw, delta_softplus=True, backend="fused")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_fused_rejects_mismatched_shapes():
    """The kernel does not bounds-check, so the wrapper must."""
    kw = _inputs(2, 8, 20, 4, 2)
    for name, bad in (("B", kw["B"][:1]), ("z", kw["z"][:, :, :10]), ("D", kw["D"][:4])):
        with pytest.raises(ValueError, match=name):
            selective_scan(**{**kw, name: bad}, backend="fused")


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    from edgeopt.ops import scan_kernel

    real = scan_kernel.fused_scan
    monkeypatch.setattr(scan_kernel, "fused_scan", spy)
    return calls


def test_default_is_fused_only_for_eager_inference(fused_calls):
    kw = _inputs(1, 8, 30, 16, 2)
    with torch.no_grad():
        selective_scan(**kw, delta_softplus=True)
    with torch.inference_mode():
        selective_scan(**kw, delta_softplus=True)
    selective_scan(**kw, delta_softplus=True)  # grad mode, but nothing requires grad
    assert len(fused_calls) == 3
    leaves = {k: v.clone().requires_grad_(k == "A") for k, v in kw.items()}
    out = selective_scan(**leaves, delta_softplus=True)
    assert len(fused_calls) == 3 and out.requires_grad  # autograd: chunked
    with pytest.raises(ValueError, match="chunked"):
        selective_scan(**leaves, delta_softplus=True, backend="fused")


def test_forward_mode_ad_keeps_its_tangent(fused_calls):
    import torch.autograd.forward_ad as fwAD

    kw = _inputs(1, 8, 30, 16, 2)
    with fwAD.dual_level():
        dual = {**kw, "u": fwAD.make_dual(kw["u"], torch.ones_like(kw["u"]))}
        tangent = fwAD.unpack_dual(selective_scan(**dual, delta_softplus=True)).tangent
    assert not fused_calls and tangent is not None
    _, want = torch.func.jvp(lambda u: selective_scan(**{**kw, "u": u}, delta_softplus=True, backend="chunked"),
                             (kw["u"],), (torch.ones_like(kw["u"]),))
    torch.testing.assert_close(tangent, want)


def test_without_numba_eager_falls_back_to_chunked(monkeypatch):
    monkeypatch.setattr(scan_module, "_fused_kernel", lambda: None)
    kw = _inputs(1, 8, 30, 16, 2)
    with torch.no_grad():
        got = selective_scan(**kw, delta_softplus=True)
    torch.testing.assert_close(got, selective_scan(**kw, delta_softplus=True, backend="reference"), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="could not be loaded"):
        selective_scan(**kw, delta_softplus=True, backend="fused")


class _Scan(nn.Module):
    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, u, delta, B, C, D, z, delta_bias):
        return selective_scan(u, delta, self.A, B, C, D, z, delta_bias=delta_bias, delta_softplus=True)


def test_exports_keep_the_chunked_graph(fused_calls):
    """Exported graphs must hold the scan (not a constant from an opaque kernel) and stay compact."""
    kw = _inputs(1, 8, 64, 16, 2)
    names = ["u", "delta", "B", "C", "D", "z", "delta_bias"]
    model = _Scan(kw["A"]).eval()
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        torch.export.export(model, tuple(kw[n] for n in names))
        torch.jit.trace(model, tuple(kw[n] for n in names), check_trace=False)
        path = Path(tmp) / "scan.onnx"
        torch.onnx.export(model, tuple(kw[n] for n in names), str(path), dynamo=True, verbose=False)
        graph = onnx.load(str(path)).graph
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not fused_calls
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"} and len(graph.node) < 400
    other = _inputs(1, 8, 64, 16, 2, seed=7)  # new inputs: a baked-in constant would not follow them
    feed = {i.name: other[n].numpy() for i, n in zip(session.get_inputs(), names, strict=True)}
    want = selective_scan(**{**other, "A": kw["A"]}, delta_softplus=True, backend="reference")
    _close(torch.from_numpy(session.run(None, feed)[0]), want)


@pytest.mark.parametrize("chunk", [1, 3, 16, 40])
def test_any_chunk_size_is_exact(chunk):
    """Padding (L not a multiple of the chunk) and one-chunk / one-token chunks change nothing."""
    kw = _inputs(2, 8, 40, 16, 2)
    u, delta, B, C = _prepare(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], None, True)
    want, _ = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], delta_softplus=True,
                             return_states=True, backend="reference")  # fmt: skip
    got, _ = _chunked(u, delta, kw["A"], B, C, want_states=False, chunk=chunk)
    _close(got, want)


def test_semantics_on_a_hand_computed_case():
    """One channel, N=1: h_t = exp(d*a) h + d*b*u, y = c*h + D*u, times silu(z)."""
    u = torch.tensor([[[1.0, 2.0]]])
    delta = torch.tensor([[[0.5, 0.5]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[1.0, 3.0]]])
    C = torch.tensor([[[2.0, 1.0]]])
    D = torch.tensor([0.5])
    z = torch.tensor([[[0.0, 1.0]]])
    h1 = 0.5 * 1.0 * 1.0
    h2 = torch.exp(torch.tensor(-1.0)) * h1 + 0.5 * 3.0 * 2.0
    want = torch.tensor([(2 * h1 + 0.5) * 0.0, (1 * h2 + 1.0) * F.silu(torch.tensor(1.0))])
    for backend in ("reference", "chunked", "fused"):
        got = selective_scan(u, delta, A, B, C, D, z, backend=backend)
        torch.testing.assert_close(got[0, 0], want)


def test_chunked_gradients_match_reference():
    kw = _inputs(1, 8, 30, 16, 2)
    grads = []
    for backend in ("reference", "chunked"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
        selective_scan(**leaves, delta_softplus=True, backend=backend).square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in kw:
        _close(grads[1][name], grads[0][name])


def test_unknown_backend_is_a_clear_error():
    kw = _inputs(1, 4, 8, 4, 1)
    with pytest.raises(InputError, match="did you mean 'chunked'"):
        selective_scan(**kw, backend="chunkd")


def test_cuda_backend_needs_cuda_tensors():
    kw = _inputs(1, 4, 8, 4, 1)
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan(**kw, backend="cuda")
