"""Offloading policies: what precision to load, what to prefetch, what to evict.

A `PolicyConfig` is data; the engine (`runtime.Engine`) runs every policy with the same
code, so baselines and HOBBIT differ only in these fields:

- token-level dynamic loading: `t1`, `t2` (s(e) = sum of normalized gate weights
  ranked above e; s <= t1 → high precision, t1 < s <= t2 → low, s > t2 → skip);
- layer-level prefetch: `prefetch_layers` (p);
- sequence-level replacement: `replacement` + `weights` (w_lru, w_lfu, w_lhu, w_fld), and
  the budget's split between the high- and low-precision pools (`high_fraction`); both are
  tuned on calibration traces by `tune_weights`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from edgeopt.errors import unknown_name

HIGH, LOW, SKIP = 2, 1, 0


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    t1: float = 1.0
    t2: float = 1.0
    force_low: bool = False
    prefetch_layers: int = 0
    high_fraction: float = 1.0
    replacement: str = "lru"  # lru | hobbit | static
    weights: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    resident: bool = False
    low_precision: str = "int4"
    high_precision: str = "fp16"
    # Calibration constraint: the budget split may not leave the high pool fewer experts than this.
    min_high_experts: int = 0
    # Whether a cached low-precision copy serves an expert that needs high precision (this engine's
    # original rule: any cached copy is a hit). HOBBIT's own rule is False: a top-ranked expert found
    # only in low precision is a miss for the high pool and is read in high precision.
    low_serves_high: bool = True

    def serves(self, need: int) -> bool:
        """May a low-precision copy serve an expert the thresholds ranked `need`?"""
        return need != HIGH or self.low_serves_high

    def decide(self, s: float) -> int:
        """HIGH / LOW / SKIP for an expert whose higher-ranked experts carry weight `s`."""
        if self.force_low:
            return LOW
        if s <= self.t1:
            return HIGH
        return LOW if s <= self.t2 else SKIP


POLICIES: dict[str, PolicyConfig] = {
    p.name: p
    for p in [
        PolicyConfig("resident", resident=True),
        PolicyConfig("lru-fp16"),
        PolicyConfig("all-low", force_low=True, high_fraction=0.0),
        PolicyConfig("static-hot", replacement="static"),
        # Prefetch walks up to 2 layers ahead (HOBBIT: p = 1-3, stopping at the first layer with a missing
        # prediction): on the 2 GB scale model at 25%, p = 2 decoded 13.2 tok/s vs 9.7-10.2 at p = 1
        # (stalls 47-48 vs 65-70 ms/token); p = 3 12.8-13.8, within noise of 2.
        PolicyConfig(
            "hobbit", t1=0.6, t2=0.9, prefetch_layers=2, high_fraction=0.25,
            replacement="hobbit", weights=(1.0, 0.5, 0.5, 0.5),
        ),
        # Ablation: HOBBIT without layer-level prefetch (isolates what prefetch buys on this host).
        PolicyConfig(
            "hobbit-noprefetch", t1=0.6, t2=0.9, prefetch_layers=0, high_fraction=0.25,
            replacement="hobbit", weights=(1.0, 0.5, 0.5, 0.5),
        ),
        # HOBBIT's own hit rule: a low-precision copy does not serve an expert that needs high precision.
        PolicyConfig(
            "hobbit-strict", t1=0.6, t2=0.9, prefetch_layers=2, high_fraction=0.25,
            replacement="hobbit", weights=(1.0, 0.5, 0.5, 0.5), low_serves_high=False,
        ),
        # HOBBIT whose budget split must keep at least one high-precision expert cached (calibration
        # may otherwise give the whole budget to the low pool and serve high-precision misses uncached).
        PolicyConfig(
            "hobbit-highpool", t1=0.6, t2=0.9, prefetch_layers=2, high_fraction=0.25,
            replacement="hobbit", weights=(1.0, 0.5, 0.5, 0.5), min_high_experts=1,
        ),
    ]
}


def get_policy(name: str, **overrides) -> PolicyConfig:
    if name not in POLICIES:
        raise unknown_name("policy", name, POLICIES)
    return replace(POLICIES[name], **{k: v for k, v in overrides.items() if v is not None})


class Records:
    """Per-sequence usage records behind the replacement priorities (reset per sequence)."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.reset()

    def reset(self) -> None:
        self.clock = 0
        self.current_layer = 0
        self.last: dict[tuple[int, int], int] = defaultdict(int)
        self.freq: dict[tuple[int, int], int] = defaultdict(int)
        self.high_uses: dict[tuple[int, int], int] = defaultdict(int)

    def access(self, key: tuple[int, int], high: bool) -> None:
        self.clock += 1
        self.last[key] = self.clock
        self.freq[key] += 1
        if high:
            self.high_uses[key] += 1


class Replacement:
    """Eviction priority (lowest evicted first) for one policy."""

    def __init__(self, policy: PolicyConfig, records: Records, static_rank: dict | None = None) -> None:
        self.policy = policy
        self.records = records
        self.static_rank = static_rank or {}

    def scorer(self, high_pool: bool) -> Callable[[tuple[int, int]], float]:
        """The priority of a key at this moment, as one function for one eviction: an eviction scores
        every unpinned entry of a pool (hundreds of int4 experts), so the clock, the current layer and
        the weights are read once, not per entry."""
        r = self.records
        if self.policy.replacement == "lru":
            return lambda key: float(r.last.get(key, 0))
        if self.policy.replacement == "static":
            rank = self.static_rank
            return lambda key: float(rank.get(key, 0))
        w_lru, w_lfu, w_lhu, w_fld = self.policy.weights
        t = max(r.clock, 1)
        last, freq, high, n, nxt = r.last, r.freq, r.high_uses, r.n_layers, r.current_layer + 1

        def score(key: tuple[int, int]) -> float:
            # Forward layer distance: the layer that runs next scores 1, the one just run 1/n.
            return ((w_lru * last.get(key, 0) + w_lfu * freq.get(key, 0) + w_lhu * high.get(key, 0)) / t
                    + w_fld * (1 - ((key[0] - nxt) % n) / n))

        return score


Trace = list[list[list[list[tuple[int, float]]]]]  # sequence → token → layer → [(expert, weight)] by rank


def miss_penalty(policy: PolicyConfig, trace: Trace, high_bytes: int, low_bytes: int, budget: int) -> float:
    """Replay routing traces through the cache; a miss costs bytes(precision)/bytes(high)."""
    from edgeopt.moe.cache import ExpertCache
    from edgeopt.moe.store import LoadedExpert

    n_layers = len(trace[0][0])
    records = Records(n_layers)
    cache = ExpertCache(int(budget * policy.high_fraction), budget - int(budget * policy.high_fraction),
                        Replacement(policy, records).scorer)
    sizes = {HIGH: high_bytes, LOW: low_bytes}
    penalty = 0.0
    for sequence in trace:
        records.reset()
        for token in sequence:
            for layer, ranked in enumerate(token):
                records.current_layer = layer
                s = 0.0
                for expert, weight in ranked:
                    need = policy.decide(s)
                    s += weight
                    key = (layer, expert)
                    entry = cache.get(key, allow_low=policy.serves(need))
                    if entry is None:
                        if need == SKIP:
                            continue
                        penalty += sizes[need] / high_bytes
                        prec = policy.high_precision if need == HIGH else policy.low_precision
                        entry = LoadedExpert(prec, None, None, sizes[need])  # type: ignore[arg-type]
                        cache.put(key, entry)
                    records.access(key, entry.precision == policy.high_precision)
    return penalty


def tune_weights(
    policy: PolicyConfig, trace: Trace, high_bytes: int, low_bytes: int, budget: int,
    grid: tuple[float, ...] = (0.0, 0.5, 1.0), high_fractions: tuple[float, ...] | None = None,
) -> tuple[PolicyConfig, float]:
    """Grid-search (w_lru, w_lfu, w_lhu, w_fld), and the budget's split between the high- and
    low-precision pools (`high_fractions`; default: keep the policy's), minimizing the replayed miss penalty.

    The split matters as much as the weights: a low-precision copy costs B_low/B_high of a
    high one, so shifting bytes to the low pool caches several experts per high one evicted.
    """
    best, best_penalty = policy, float("inf")
    for fraction in high_fractions or (policy.high_fraction,):
        for weights in itertools.product(grid, repeat=4):
            if not any(weights):
                continue
            candidate = replace(policy, weights=weights, high_fraction=fraction)
            penalty = miss_penalty(candidate, trace, high_bytes, low_bytes, budget)
            if penalty < best_penalty:
                best, best_penalty = candidate, penalty
    return best, best_penalty
