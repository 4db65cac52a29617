"""Helpers shared by the MoE offloading tests."""

from __future__ import annotations

import torch


def decode_logits(lm, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits for every position of `ids`: a prefill of `prefill` tokens, then one decode step per token."""
    logits, state = lm(ids[:, :prefill])
    out = [logits]
    for i in range(prefill, ids.shape[1]):
        logits, state = lm(ids[:, i : i + 1], state)
        out.append(logits)
    return torch.cat(out, 1)
