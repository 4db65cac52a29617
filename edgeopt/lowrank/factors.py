"""Truncated SVD factors of a weight W (m x n) as W ~ L @ R with L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T.

Whitened (activation-aware) factors follow SVD-LLM: with calibration inputs X (n x samples) and
X X^T = S S^T (Cholesky), the SVD of W S gives singular values whose dropped tail is exactly the
output error ||(W - L R) X||_F^2, so truncation minimizes the error on real activations instead of
on the weights. Hand-written because it is a few lines of torch.linalg no library packages for
arbitrary stacked weights (per-direction SS2D projections, the A_logs matrix).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def spectrum(weight: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values (float64) of W, or of W S when the input Gram matrix is given."""
    return torch.linalg.svdvals(_whitened(weight.detach().double(), gram)[0])


def svd_factors(
    weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m x r, r x n) factors: the best rank-r approximation of W (in the activation metric if `gram`)."""
    whitened, chol = _whitened(weight.detach().double(), gram)
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
    if chol is not None:  # right = sqrt(S) V^T S^-1, solved rather than inverted
        right = torch.linalg.solve_triangular(chol, right, upper=False, left=False)
    return left.to(weight.dtype), right.to(weight.dtype)


def _whitened(weight: torch.Tensor, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if gram is None:
        return weight, None
    gram = gram.double()
    n = gram.shape[0]
    # A small ridge keeps Cholesky defined when calibration inputs do not span every direction.
    ridge = 1e-6 * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(n, dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram + ridge)
    return weight @ chol, chol


def rank_for_ratio(rows: int, cols: int, ratio: float) -> int:
    """Rank whose factors keep at most `ratio` of a rows x cols matrix's parameters:
    floor(ratio rows cols / (rows + cols)), at least 1. The product is exact (a float product
    can land just under an integer and floor one rank too low). `ratio` 1.0 means no
    factorization: full rank, which saves nothing, so the layer is left as it is."""
    if ratio >= 1:
        return min(rows, cols)
    exact = Fraction(str(ratio)) * rows * cols / (rows + cols)
    return max(1, min(rows, cols, math.floor(exact)))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping `energy` of the squared singular values."""
    power = singular_values.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum().clamp(min=1e-30)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1


def factor_params(rows: int, cols: int, rank: int) -> int:
    return rank * (rows + cols)


def saves_params(rows: int, cols: int, rank: int) -> bool:
    return factor_params(rows, cols, rank) < rows * cols
