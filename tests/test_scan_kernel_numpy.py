"""The fused selective-scan kernel (numba) against a float64 numpy reference, torch-free.

Runs here and, unchanged, on the emulated arm64 board (tests/test_emulated_rpi5.py copies this
file and edgeopt/ops/scan_kernel.py there): the kernel's exp/softplus polynomials, its bit-cast
intrinsic and its vectorized loops are compiled by LLVM for NEON instead of AVX there.
`python test_scan_kernel_numpy.py` prints the kernel's worst errors on this machine.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

try:
    from edgeopt.ops import scan_kernel
except ImportError:  # on the board: no edgeopt, no torch; the kernel file sits next to this one
    import scan_kernel  # type: ignore[no-redef]

F32 = np.float32
CASES = [  # batch, dim, length, nstate, groups
    (2, 8, 37, 16, 1),
    (1, 12, 50, 1, 3),
    (2, 16, 64, 16, 4),
    (1, 6, 1, 4, 2),
    (3, 4, 200, 1, 1),
]


def _inputs(batch: int, dim: int, length: int, nstate: int, groups: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "u": rng.standard_normal((batch, dim, length)).astype(F32),
        "delta": (rng.standard_normal((batch, dim, length)) - 1.0).astype(F32),
        "A": (-np.exp(rng.standard_normal((dim, nstate)))).astype(F32),
        "B": rng.standard_normal((batch, groups, length, nstate)).astype(F32),
        "C": rng.standard_normal((batch, groups, length, nstate)).astype(F32),
        "D": rng.standard_normal(dim).astype(F32),
        "z": rng.standard_normal((batch, dim, length)).astype(F32),
        "bias": (rng.standard_normal(dim) * 0.5).astype(F32),
    }


def reference(u, delta, A, B, C, D, z, bias, softplus: bool) -> tuple[np.ndarray, np.ndarray]:
    """(out, states) in float64, one time step at a time: the scan's definition."""
    u, delta, A, B, C, D, z, bias = (np.asarray(a, np.float64) for a in (u, delta, A, B, C, D, z, bias))
    batch, dim, length = u.shape
    group = np.arange(dim) // (dim // B.shape[1])
    dt = delta + bias[None, :, None]
    if softplus:
        dt = np.where(dt > 20, dt, np.log1p(np.exp(np.minimum(dt, 20))))
    h = np.zeros((batch, dim, A.shape[1]))
    out = np.empty((batch, dim, length))
    states = np.empty((batch, dim, length, A.shape[1]))
    for t in range(length):
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, group, t]
        states[:, :, t] = h
        out[:, :, t] = (h * C[:, group, t]).sum(-1)
    out = (out + D[None, :, None] * u) * z / (1 + np.exp(-z))
    return out, states


def fused(x: dict[str, np.ndarray], softplus: bool = True) -> tuple[np.ndarray, np.ndarray]:
    batch, dim, length = x["u"].shape
    out = np.empty((batch, dim, length), F32)
    states = np.empty((batch, dim, length, x["A"].shape[1]), F32)
    scan_kernel._scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], softplus, out, states)
    return out, states


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the kernel's error in units of the output's scale."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("batch,dim,length,nstate,groups", CASES)
def test_fused_kernel_matches_float64_reference(batch, dim, length, nstate, groups):
    x = _inputs(batch, dim, length, nstate, groups)
    out, states = fused(x)
    want_out, want_states = reference(**x, softplus=True)
    assert relative_error(out, want_out) < 1e-5
    assert relative_error(states, want_states) < 1e-5


def test_fused_kernel_extreme_deltas_stay_finite():
    x = _inputs(1, 4, 40, 8, 1, seed=1)
    x["delta"] = np.where(np.arange(40) % 2 == 0, F32(60.0), F32(-60.0)).astype(F32) * np.ones_like(x["delta"])
    out, _ = fused(x)
    want, _ = reference(**x, softplus=True)
    assert np.isfinite(out).all()
    assert relative_error(out, want) < 1e-5


def test_exp_and_softplus_polynomials():
    """The docstring's claim: within 3e-7 relative of float64 over [-87, 88]."""
    xs = np.linspace(-87.0, 88.0, 20001).astype(F32)
    exp = np.array([scan_kernel._exp(v) for v in xs[::10]], np.float64)
    want = np.exp(xs[::10].astype(np.float64))
    assert float(np.max(np.abs(exp - want) / want)) < 3e-7
    sp_x = np.linspace(-30.0, 30.0, 601).astype(F32)
    softplus = np.array([scan_kernel._softplus(v) for v in sp_x], np.float64)
    sp_want = np.where(sp_x > 20, sp_x, np.log1p(np.exp(sp_x.astype(np.float64))))
    assert float(np.max(np.abs(softplus - sp_want) / np.maximum(sp_want, 1e-30))) < 3e-6


def main() -> None:
    worst = 0.0
    for case in CASES:
        x = _inputs(*case)
        got, _ = fused(x)
        error = relative_error(got, reference(**x, softplus=True)[0])
        worst = max(worst, error)
        print(f"{platform.machine()} case {case}: max rel error {error:.2e}")
    print(f"{platform.machine()} worst max rel error {worst:.2e}")


if __name__ == "__main__":
    main()
