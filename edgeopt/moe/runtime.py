"""The offloading engine: each MoE block's `experts` module becomes a view onto the store.

`OffloadedExperts(x, top_k_index, top_k_weights)` keeps the call signature of
transformers' fused experts and of `edgeopt.models.moe.Experts`, so the router (and
everything else) stays the model's own code. Per call the engine:

1. ranks each token's top-k experts, computes s(e) and the needed precision;
2. serves hits from the cache, sends misses to the loader thread (demand first).
   With `low_serves_high` (the original rule) an expert cached (or already being read)
   at either precision is a hit and the thresholds only choose what to *load* on a miss;
   without it (HOBBIT's rule, policy `hobbit-strict`) an expert that needs high precision
   and is cached only in low precision is a miss, read in high precision;
3. predicts the next layers' experts from the current gate input (one stacked
   matmul), pins them and prefetches them in mixed precision;
4. computes the experts that are ready while the others are still being read;
5. caches what it loaded under the policy's replacement priority.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.moe import kernels
from edgeopt.moe.cache import ExpertCache, Key
from edgeopt.moe.loader import DEMAND, PREFETCH, Loader
from edgeopt.moe.policy import HIGH, LOW, SKIP, PolicyConfig, Records, Replacement
from edgeopt.moe.store import ExpertStore, LoadedExpert

READ_WINDOW = 4  # demand reads in flight per layer (the loader has 2 workers)


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    skipped: int = 0
    high_uses: int = 0
    low_uses: int = 0
    stall_s: float = 0.0
    demand_loads: int = 0
    prefetch_loads: int = 0
    predicted: int = 0
    predicted_right: int = 0
    peak_held_bytes: int = 0  # finished prefetches no pool took, waiting for their layer (outside the budget)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_right / max(self.predicted, 1)


class Engine:
    """Runs the experts of every MoE layer out of an `ExpertStore` under one policy and byte budget."""

    def __init__(
        self,
        store: ExpertStore,
        policy: PolicyConfig,
        budget_bytes: int | None,
        gate_weights: list[torch.Tensor],
        hot_counts: dict[Key, int] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.n_layers = store.n_layers
        self.high = policy.high_precision
        self.low = policy.low_precision
        for precision in (self.high, self.low):
            if precision not in store.precisions:
                raise ValueError(f"store has no {precision} records (has {store.precisions})")
        # Fully resident experts without the expert kernels are held as fp32 (`LoadedExpert.upcast`):
        # memory is there by assumption, and converting on every use was the largest cost of a resident step.
        self.upcast_resident = policy.resident and self.high == "fp16" and not kernels.available()
        if policy.resident or budget_bytes is None:
            budget_bytes = store.total_bytes(self.high) * (2 if self.upcast_resident else 1)
        self.budget = int(budget_bytes)
        high_bytes = int(self.budget * policy.high_fraction)
        self.records = Records(self.n_layers)
        static_rank = {k: float(v) for k, v in (hot_counts or {}).items()}
        self.cache = ExpertCache(high_bytes, self.budget - high_bytes, Replacement(policy, self.records, static_rank).scorer)
        # Prefetch (need → precision) only where the pool could keep such a record: a read no pool can
        # keep (e.g. a zero-sized high-precision pool) would be a buffer outside the budget, and a
        # low-precision stand-in would change what the token computes.
        self.prefetch_precision = {
            need: precision
            for need, precision, pool in ((HIGH, self.high, self.cache.high), (LOW, self.low, self.cache.low))
            if store.record_nbytes(precision) <= pool.capacity
        }
        gates = [g.detach().float() for g in gate_weights]
        # Per layer, the next p layers' router weights stacked: prediction is one matmul.
        self.stacked_gates = [torch.cat(gates[i + 1 : i + 1 + policy.prefetch_layers] or [gates[i][:0]])
                              for i in range(len(gates))]
        self.top_k = 0
        self.loader = Loader(self.store.read)
        self.inflight: dict[tuple[int, int, str], Future] = {}
        self.prefetched: set[tuple[int, int, str]] = set()
        self.predictions: dict[int, set[int]] = {}
        self.stats = Stats()
        self.tracer = None  # optional callable(layer, token, [(expert, normalized weight)] by rank) for calibration
        # Fully resident: every expert by layer, for the decode fast path (`_run_resident`).
        self.resident: list[list[LoadedExpert]] | None = None
        if policy.resident:
            self._preload([(layer, e) for layer in range(self.n_layers) for e in range(store.n_experts)], pin=False)
            self.resident = [[self.cache.high.entries[(layer, e)] for e in range(store.n_experts)]
                             for layer in range(self.n_layers)]
        elif policy.replacement == "static":
            hot = sorted(static_rank, key=lambda k: -static_rank[k])
            self._preload(hot, pin=True)

    # -- set-up -------------------------------------------------------------------------------
    def _preload(self, keys: list[Key], pin: bool) -> None:
        """Fill the high pool before decoding starts (resident / static placement); not timed."""
        for key in keys:
            entry = self.store.read(key[0], key[1], self.high)
            if self.upcast_resident:
                entry = entry.upcast()
            if not self.cache.put(key, entry):
                break
            if pin:
                self.cache.pinned.add(key)

    def reset_sequence(self) -> None:
        self._drain()
        self.records.reset()
        self.predictions.clear()
        if self.policy.replacement != "static":
            self.cache.pinned.clear()

    def close(self) -> None:
        self._drain()
        self.loader.close()

    def quiesce(self) -> None:
        """Stop background reads: cancel queued prefetches, wait for the one in progress."""
        self._drain()

    def _drain(self) -> None:
        """Cancel queued prefetches and wait for the read in progress (a new sequence starts clean)."""
        for key, fut in list(self.inflight.items()):
            if key in self.prefetched and fut.cancel():
                del self.inflight[key]
                self.prefetched.discard(key)
        for fut in list(self.inflight.values()):
            fut.exception()
        self._harvest()

    # -- loading -------------------------------------------------------------------------------
    def _submit(self, layer: int, expert: int, precision: str, prefetch: bool) -> Future:
        key = (layer, expert, precision)
        fut = self.inflight.get(key)
        if fut is None:
            fut = self.loader.submit(PREFETCH if prefetch else DEMAND, layer, expert, precision)
            self.inflight[key] = fut
            if prefetch:
                self.stats.prefetch_loads += 1
                self.prefetched.add(key)
            else:
                self.stats.demand_loads += 1
        return fut

    def _harvest(self) -> None:
        """Move finished prefetches into the cache (main thread only: the cache is not shared).

        A prefetch its pool cannot take right now (full of pinned experts) stays in flight until
        its layer runs or the routing proves it stale, but only while the cache plus such held
        buffers stay within the byte budget; beyond that it is dropped (prefetching never buys
        memory the baselines don't get).
        """
        held = 0
        for key in [k for k in self.prefetched if self.inflight[k].done()]:
            fut = self.inflight[key]
            failed = not fut.cancelled() and fut.exception() is not None
            if not (fut.cancelled() or failed or self.cache.put(key[:2], fut.result())):
                nbytes = fut.result().nbytes
                if self.cache.used + held + nbytes <= self.budget:
                    held += nbytes
                    continue
            del self.inflight[key]
            self.prefetched.discard(key)
            if failed:
                fut.result()  # re-raise the loader's error (e.g. a corrupted record) here
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, held)

    def _pending(self, layer: int, expert: int, need: int) -> Future | None:
        """A read already queued or running for this expert at a precision that serves `need` (moved to the front)."""
        for precision in (self.high, self.low) if self.policy.serves(need) else (self.high,):
            fut = self.inflight.get((layer, expert, precision))
            if fut is not None:
                self.loader.promote(fut, layer, expert, precision)
                return fut
        return None

    def _cancel_stale(self, layer: int, needed: set[int]) -> None:
        """Drop prefetches the routing proved wrong: queued ones before they use device bandwidth,
        finished ones that no pool took (their buffer is freed)."""
        for key in [k for k in self.prefetched if k[0] < layer or (k[0] == layer and k[1] not in needed)]:
            fut = self.inflight[key]
            if fut.cancel() or fut.done():
                del self.inflight[key]
                self.prefetched.discard(key)

    def _queued(self, layer: int, expert: int, need: int) -> bool:
        return (layer, expert, self.high) in self.inflight or (
            self.policy.serves(need) and (layer, expert, self.low) in self.inflight)

    # -- prefetch -------------------------------------------------------------------------------
    def _prefetch(self, layer: int, x: torch.Tensor) -> None:
        """Predict the next layers' experts from this layer's gate input; pin and prefetch them."""
        p = min(self.policy.prefetch_layers, self.n_layers - 1 - layer)
        if p <= 0:
            return
        # One matmul for p layers; softmax over the top-k logits = renormalized top-k probabilities.
        logits = F.linear(x[-1:].to(self.stacked_gates[layer].dtype), self.stacked_gates[layer]).view(p, -1)
        top, experts = logits.topk(self.top_k, dim=-1)
        weights, experts = top.softmax(-1).tolist(), experts.tolist()
        for d in range(p):
            target = layer + 1 + d
            self._unpin(target)  # a newer prediction for this layer replaces the older one
            missing = False
            s = 0.0
            chosen = set()
            for e, w in zip(experts[d], weights[d], strict=False):
                need = self.policy.decide(s)
                s += w
                if need == SKIP:
                    continue
                chosen.add(e)
                key = (target, e)
                self.cache.pinned.add(key)
                precision = self.prefetch_precision.get(need)
                if (precision and self.cache.get(key, allow_low=self.policy.serves(need)) is None
                        and not self._queued(target, e, need)):
                    self._submit(target, e, precision, prefetch=True)
                    missing = True
            self.predictions[target] = chosen
            if missing:
                break

    # -- the experts call -------------------------------------------------------------------------
    def run_experts(
        self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self.top_k = top_k_index.shape[-1]
        if self.resident is not None and x.shape[0] == 1 and self.tracer is None:
            return self._run_resident(layer, x, top_k_index, top_k_weights)
        self._harvest()
        self.records.current_layer = layer
        # Routing bookkeeping in plain Python on two small lists: a decode step has top_k entries,
        # and a dozen tiny tensor ops per layer cost more than the experts' own compute here.
        weights = top_k_weights.tolist()
        need: dict[int, int] = {}
        users: dict[int, list[tuple[int, float]]] = defaultdict(list)  # expert → [(token, weight)]
        for t, (es, ws) in enumerate(zip(top_k_index.tolist(), weights, strict=True)):
            total = sum(ws)
            ranked = sorted(zip(es, ws, strict=True), key=lambda ew: -ew[1])
            if self.tracer is not None:
                self.tracer(layer, t, [(e, w / total) for e, w in ranked])
            s = 0.0
            for e, w in ranked:
                decision = self.policy.decide(s)
                s += w / total
                need[e] = max(need.get(e, SKIP), decision)
                users[e].append((t, w))
        self._score_prediction(layer, need)

        ready: dict[int, LoadedExpert] = {}
        waiting: dict[int, Future | None] = {}  # None: a demand read not submitted yet (see `_demand`)
        unsent: dict[int, str] = {}
        for e, n in need.items():
            entry = self.cache.get((layer, e), allow_low=self.policy.serves(n))
            if entry is not None:
                ready[e] = entry
                self.stats.hits += 1
                continue
            fut = self._pending(layer, e, n)
            if n == SKIP and fut is None:
                self.stats.skipped += 1
                continue
            self.stats.misses += 1
            waiting[e] = fut
            if fut is None:
                unsent[e] = self.high if n == HIGH else self.low
        order = list(waiting)
        self._demand(layer, waiting, unsent, order, 0)
        self._cancel_stale(layer, set(waiting))
        if x.shape[0] == 1:
            self._prefetch(layer, x)

        out = None
        for e, entry in ready.items():
            out = self._apply(layer, e, entry, x, users[e], out)
        for i, e in enumerate(order):
            self._demand(layer, waiting, unsent, order, i)
            fut = waiting[e]
            t0 = time.perf_counter()
            entry = fut.result()
            self.stats.stall_s += time.perf_counter() - t0
            key = (layer, e, entry.precision)
            if self.inflight.get(key) is fut:
                del self.inflight[key]
                self.prefetched.discard(key)
            out = self._apply(layer, e, entry, x, users[e], out)
            self.cache.put((layer, e), entry)
        self._unpin(layer)
        return torch.zeros_like(x) if out is None else out

    def _run_resident(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """One decoded token with every expert in memory: nothing to rank, read, prefetch or evict, so
        none of the bookkeeping below runs (it cost ~30% of a resident decode step on moe-lm)."""
        experts = self.resident[layer]
        out = None
        for e, w in zip(top_k_index[0].tolist(), top_k_weights[0].tolist(), strict=True):
            y = experts[e].forward(x)
            out = y.mul_(w) if out is None else out.add_(y, alpha=w)
        self.stats.hits += self.top_k
        self.stats.high_uses += self.top_k
        return out

    def _demand(self, layer: int, waiting: dict, unsent: dict, order: list[int], i: int) -> None:
        """Submit the demand reads of experts order[i : i + READ_WINDOW] not yet sent. A window rather than
        all at once: a prefill can miss every expert of a layer, and each read's buffer lives outside the
        cache budget until its expert has run (64 fp16 records = 300 MB on the scale model); a window of
        twice the loader's workers keeps the device busy while the compute thread catches up."""
        for e in order[i : i + READ_WINDOW]:
            if waiting[e] is None:
                waiting[e] = self._submit(layer, e, unsent.pop(e), prefetch=False)

    def _unpin(self, layer: int) -> None:
        for e in self.predictions.pop(layer, ()):
            if self.policy.replacement != "static":
                self.cache.pinned.discard((layer, e))

    def _apply(self, layer, e, entry, x, uses, out) -> torch.Tensor:
        """out + this expert's gate-weighted output for the tokens in `uses`."""
        is_high = entry.precision == self.high
        self.records.access((layer, e), is_high)
        self.stats.high_uses += is_high
        self.stats.low_uses += not is_high
        if x.shape[0] == 1:  # decode: one token, no gather/scatter
            y = entry.forward(x)
            return y.mul_(uses[0][1]) if out is None else out.add_(y, alpha=uses[0][1])
        if out is None:
            out = torch.zeros_like(x)
        tokens = torch.tensor([t for t, _ in uses])
        y = entry.forward(x[tokens])
        return out.index_add_(0, tokens, y * torch.tensor([w for _, w in uses], dtype=y.dtype)[:, None])

    def _score_prediction(self, layer: int, need: dict[int, int]) -> None:
        predicted = self.predictions.get(layer)
        if predicted is None:
            return
        actual = {e for e, n in need.items() if n != SKIP}
        self.stats.predicted += len(actual)
        self.stats.predicted_right += len(actual & predicted)


class OffloadedExperts(nn.Module):
    """Drop-in for a block's `experts` module: same call, weights come from the engine."""

    def __init__(self, engine: Engine, layer: int) -> None:
        super().__init__()
        self.engine = engine
        self.layer = layer

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.engine.run_experts(self.layer, hidden_states, top_k_index, top_k_weights)
