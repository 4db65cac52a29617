"""Generic low-rank factorization of nn.Linear by truncated SVD."""

from __future__ import annotations

import torch
from torch import nn

from edgeopt.passes.lowrank import factorize_linear, rank_for_ratio, saves_params


def test_full_rank_reproduces_layer_exactly():
    torch.manual_seed(0)
    layer = nn.Linear(48, 32)
    x = torch.randn(16, 48)
    factorized = factorize_linear(layer, rank=32)
    torch.testing.assert_close(factorized(x), layer(x), atol=1e-5, rtol=1e-5)


def test_truncation_error_is_the_dropped_singular_values():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64, bias=False)
    rank = 16
    factorized = factorize_linear(layer, rank)
    approx = factorized.second.weight @ factorized.first.weight
    s = torch.linalg.svdvals(layer.weight.detach())
    error = torch.linalg.matrix_norm(layer.weight.detach() - approx)
    torch.testing.assert_close(error, s[rank:].norm(), atol=1e-4, rtol=1e-4)


def test_rank_ratio_keeps_that_share_of_parameters():
    for ratio in (0.65, 0.6, 0.55, 0.5):
        rank = rank_for_ratio(256, 128, ratio)
        kept = rank * (256 + 128) / (256 * 128)
        assert ratio - 0.02 < kept <= ratio
        assert saves_params(256, 128, rank)
    assert not saves_params(64, 64, 32)
