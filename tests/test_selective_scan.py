"""The chunked selective scan agrees with the reference loop (mamba-ssm semantics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeopt.errors import InputError
from edgeopt.ops import selective_scan
from edgeopt.ops.selective_scan import _chunked, _prepare


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
def test_chunked_matches_reference(batch, dim, length, nstate, groups, grouped, with_z_bias):
    kw = _inputs(batch, dim, length, nstate, groups, seed=length, grouped=grouped)
    if not with_z_bias:
        kw.update(z=None, delta_bias=None, D=None)
    want, want_h = selective_scan(**kw, delta_softplus=True, return_states=True, backend="reference")
    got, got_h = selective_scan(**kw, delta_softplus=True, return_states=True)  # default backend
    assert got.shape == (batch, dim, length) and got_h.shape == (batch, dim, length, nstate)
    _close(got, want)
    _close(got_h, want_h)


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
    for backend in ("reference", "chunked"):
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
