"""Routing statistics of a MoE: how skewed expert popularity is and how fast tokens switch experts.

Expert caching pays off exactly as far as routing is skewed (a few experts take most tokens) and
persistent (consecutive tokens reuse experts), so a benchmark workload is only realistic if these
two numbers are. Both are given raw and as a *lift* over uniform random routing, because the raw
values depend on the number of experts E and top-k (random routing: top-expert share 1/E, reuse
k/E), and the lift is what carries over from a trained model with other E and k.

- switch rate: share of a token's top-k experts (per layer) not among the previous token's top-k;
- top-expert share: share of a sequence's routed (token, slot) pairs that went to the layer's most used
  expert in that sequence, averaged over sequences (a cache lives through one sequence: its records
  are reset per sequence, so within-sequence skew is what it can exploit).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

Trace = list[list[list[list[tuple[int, float]]]]]  # sequence → token → layer → [(expert, weight)] by rank


@dataclass(frozen=True)
class LayerRouting:
    switch_rate: float
    top_share: float
    reuse_lift: float  # (1 - switch_rate) / (k / E): 1 = random, E/k = the same experts every token
    top_lift: float  # top_share · E: 1 = uniform popularity


def routing_stats(trace: Trace, n_experts: int) -> list[LayerRouting]:
    """Per-layer switch rate and top-expert share of a routing trace (see the module docstring)."""
    n_layers = len(trace[0][0])
    out = []
    for layer in range(n_layers):
        shares = []
        switched = compared = 0
        k = 0
        for sequence in trace:
            counts: Counter = Counter()
            previous: set[int] | None = None
            for token in sequence:
                experts = {e for e, _ in token[layer]}
                k = max(k, len(experts))
                counts.update(experts)
                if previous is not None:
                    switched += len(experts - previous)
                    compared += len(experts)
                previous = experts
            shares.append(max(counts.values()) / max(sum(counts.values()), 1))
        switch = switched / max(compared, 1)
        top = sum(shares) / max(len(shares), 1)
        out.append(LayerRouting(switch, top, (1 - switch) / (k / n_experts), top * n_experts))
    return out


def format_stats(stats: list[LayerRouting]) -> str:
    """One line per statistic, layers left to right, plus the mean."""
    def row(name: str, values: list[float], fmt: str) -> str:
        return f"{name:<24}" + " ".join(format(v, fmt) for v in values) + f"   mean {format(sum(values) / len(values), fmt)}"

    return "\n".join([
        row("expert switch rate", [s.switch_rate for s in stats], ".2f"),
        row("  reuse lift vs random", [s.reuse_lift for s in stats], ".2f"),
        row("top-expert share", [s.top_share for s in stats], ".3f"),
        row("  lift vs uniform", [s.top_lift for s in stats], ".2f"),
    ])
