"""Offloading engine: exactness, the T1/T2 precision split, prefetch, and the byte budget."""

from __future__ import annotations

import json

import pytest
import torch
from moe_fixtures import decode_logits
from safetensors.torch import save_file

from edgeopt.models.moe import MoEConfig, MoELM, swiglu_expert
from edgeopt.moe.cache import ExpertCache
from edgeopt.moe.offload import OffloadedLM, pack
from edgeopt.moe.store import LoadedExpert

CFG = MoEConfig(d_model=64, n_layers=3, n_heads=4, n_experts=4, d_ff=128)


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    torch.manual_seed(0)
    model = MoELM(CFG).eval()
    with torch.no_grad():  # fp16-representable weights: the fp16 store is then exact
        for p in model.parameters():
            p.copy_(p.half().float())
    d = tmp_path_factory.mktemp("moe")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "m.safetensors"),
              metadata={"config": json.dumps(CFG.to_dict())})
    return model, pack(d / "m.safetensors", d / "store", ("fp16", "int4"))


@pytest.mark.parametrize("policy,fraction", [("hobbit", 1.0), ("hobbit", 0.3), ("lru-fp16", 0.25)])
def test_all_high_precision_equals_plain_model(model_and_store, policy, fraction):
    model, store = model_and_store
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(ids)
    lm = OffloadedLM(store, policy, budget_fraction=fraction, t1=1.0, t2=1.0)
    got = decode_logits(lm, ids, prefill=5)
    stats = lm.engine.stats
    lm.close()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert stats.low_uses == 0 and stats.skipped == 0
    if fraction < 1:
        assert stats.misses > 0  # experts really came from the store


@pytest.mark.parametrize(
    "weights,expected",  # (high, low, skipped) uses for top-2 with T1 = 0.6, T2 = 0.9
    [((0.55, 0.45), (2, 0, 0)), ((0.3, 0.7), (1, 1, 0)), ((0.95, 0.05), (1, 0, 1)), ((0.5, 0.5), (2, 0, 0)), ((0.85, 0.15), (1, 1, 0))],
)
def test_precision_split_follows_thresholds(model_and_store, weights, expected):
    model, store = model_and_store
    lm = OffloadedLM(store, "hobbit", budget_fraction=0.5, prefetch_layers=0)
    x = torch.randn(1, CFG.d_model)
    index, w = torch.tensor([[1, 3]]), torch.tensor([weights])
    out = lm.engine.run_experts(0, x, index, w)
    stats = lm.engine.stats
    assert (stats.high_uses, stats.low_uses, stats.skipped) == expected
    experts = model.layers[0].moe.experts
    top = int(index[0, w[0].argmax()])
    want = swiglu_expert(x, experts.gate_up_proj[top], experts.down_proj[top]) * w[0].max()
    if expected[2]:  # the skipped expert contributes nothing
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    elif expected[1]:  # the low-precision one is close, not exact
        full = sum(swiglu_expert(x, experts.gate_up_proj[e], experts.down_proj[e]) * w[0, i] for i, e in enumerate([1, 3]))
        assert 0 < (out - full).norm() / full.norm() < 0.2
        assert lm.engine.cache.contains((0, top), "fp16") and lm.engine.cache.contains((0, 4 - top), "int4")
    lm.close()


def test_prefetch_predicts_from_stacked_gates(model_and_store):
    model, store = model_and_store
    lm = OffloadedLM(store, "hobbit", budget_fraction=0.5, prefetch_layers=2)
    engine = lm.engine
    x = torch.randn(1, CFG.d_model)
    engine.run_experts(0, x, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    for layer in (1, 2):
        if layer not in engine.predictions:
            continue
        expect = set((x @ model.layers[layer].moe.gate.weight.T).topk(2).indices[0].tolist())
        assert engine.predictions[layer] <= expect
        assert all((layer, e) in engine.cache.pinned for e in engine.predictions[layer])
    assert engine.predictions, "nothing predicted"
    engine.run_experts(1, x, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    assert engine.stats.predicted == 2
    assert not any(k[0] == 1 for k in engine.cache.pinned)  # pins end when the layer has run
    lm.close()


@pytest.mark.parametrize("policy", ["hobbit", "lru-fp16", "all-low", "static-hot"])
def test_cache_never_exceeds_budget(model_and_store, policy, monkeypatch):
    _, store = model_and_store
    seen = []
    original = ExpertCache.put

    def put(self, key, entry):
        ok = original(self, key, entry)
        seen.append((self.high.used, self.low.used, self.high.capacity, self.low.capacity))
        return ok

    monkeypatch.setattr(ExpertCache, "put", put)
    hot = {(layer, e): 10 - e for layer in range(CFG.n_layers) for e in range(CFG.n_experts)}
    lm = OffloadedLM(store, policy, budget_fraction=0.2, hot_counts=hot)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    decode_logits(lm, ids, prefill=5)
    budget = lm.engine.budget
    assert lm.engine.stats.misses > 0
    lm.close()
    assert seen and all(h <= hc and lo <= lc for h, lo, hc, lc in seen)
    assert max(h + lo for h, lo, _, _ in seen) <= budget


def test_pinned_entries_are_not_evicted():
    cache = ExpertCache(100, 0, scorer=lambda high: lambda key: key[1])
    entry = LoadedExpert("fp16", None, None, 40)
    assert cache.put((0, 0), entry) and cache.put((0, 1), entry)
    cache.pinned.add((0, 0))
    assert cache.put((0, 2), entry)  # evicts (0, 1), the lowest unpinned priority
    assert set(cache.high.entries) == {(0, 0), (0, 2)}
    cache.pinned.add((0, 2))
    assert not cache.put((0, 3), entry)  # everything pinned: not cached, budget kept
    assert cache.used == 80


def test_prefetch_only_what_a_pool_can_keep(model_and_store):
    """A zero-sized high-precision pool: the top-1 (high-precision) prediction is not prefetched
    (no pool could keep it: it would be memory outside the budget); the low-precision one is,
    lands in the low pool and serves its layer without a second read."""
    _, store = model_and_store
    # T1 = 0, T2 = 1: each predicted top-1 wants high precision, the second low
    lm = OffloadedLM(store, "hobbit", budget_fraction=0.5, high_fraction=0.0, prefetch_layers=1, t1=0.0, t2=1.0)
    engine = lm.engine
    x = torch.randn(1, CFG.d_model, generator=torch.Generator().manual_seed(0))
    engine.run_experts(0, x, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    assert len(engine.predictions[1]) == 2
    prefetched = [k for k in engine.inflight if k[0] == 1]
    assert engine.stats.prefetch_loads == len(prefetched) == 1 and prefetched[0][2] == engine.low
    for fut in list(engine.inflight.values()):
        fut.result()
    engine._harvest()
    assert (1, prefetched[0][1]) in engine.cache.low.entries and not engine.cache.high.entries
    assert engine.stats.peak_held_bytes == 0 and engine.cache.used <= engine.budget
    lm.close()


def test_tuning_chooses_the_pool_split_within_its_constraint():
    from types import SimpleNamespace

    from edgeopt.moe.bench import tune_hobbit
    from edgeopt.moe.policy import get_policy, miss_penalty, tune_weights

    gen = torch.Generator().manual_seed(0)
    pairs = [torch.randperm(6, generator=gen)[:2].tolist() for _ in range(200)]
    trace = [[[[(a, 0.7), (b, 0.3)]] for a, b in pairs]]  # 1 sequence, 1 layer: top-1 high, second low
    high, low, budget = 4, 1, 8
    best, penalty = tune_weights(get_policy("hobbit"), trace, high, low, budget, high_fractions=(0.0, 0.5, 1.0))
    assert penalty == miss_penalty(best, trace, high, low, budget)
    for fraction in (0.0, 0.5, 1.0):
        assert penalty <= tune_weights(get_policy("hobbit"), trace, high, low, budget, high_fractions=(fraction,))[1]
    store = SimpleNamespace(record_nbytes=lambda precision: high if precision == "fp16" else low)
    tuned = tune_hobbit(trace, store, budget, ["hobbit", "hobbit-highpool"])
    assert budget * tuned["hobbit-highpool"]["high_fraction"] >= high  # keeps at least one fp16 expert


@pytest.mark.parametrize("policy,expected_precision", [("hobbit", "int4"), ("hobbit-strict", "fp16")])
def test_low_copy_serves_a_top_ranked_expert_only_under_the_old_rule(model_and_store, policy, expected_precision):
    """Expert 1 is cached in int4 (it ranked second); when it ranks first, today's rule serves the int4
    copy, HOBBIT's rule (`hobbit-strict`) counts a miss and reads it in fp16."""
    _, store = model_and_store
    lm = OffloadedLM(store, policy, budget_fraction=0.5, prefetch_layers=0, high_fraction=0.5)
    engine = lm.engine
    x = torch.randn(1, CFG.d_model)
    engine.run_experts(0, x, torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]]))  # 3 in fp16, 1 in int4
    assert engine.cache.contains((0, 1), "int4") and not engine.cache.contains((0, 1), "fp16")
    misses = engine.stats.misses
    engine.run_experts(0, x, torch.tensor([[1, 3]]), torch.tensor([[0.7, 0.3]]))  # now 1 ranks first
    lm.close()
    assert engine.stats.misses - misses == (1 if expected_precision == "fp16" else 0)
    assert engine.cache.get((0, 1), allow_low=True).precision == expected_precision


def test_demand_reads_are_windowed(model_and_store, monkeypatch):
    """A prefill that misses every expert keeps at most READ_WINDOW demand reads (buffers outside the
    budget) in flight, and still computes exactly."""
    from edgeopt.moe import runtime

    monkeypatch.setattr(runtime, "READ_WINDOW", 1)
    model, store = model_and_store
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = model(ids)
    lm = OffloadedLM(store, "lru-fp16", budget_fraction=0.25)
    engine, peak = lm.engine, []
    submit = engine._submit

    def counting(layer, expert, precision, prefetch):
        fut = submit(layer, expert, precision, prefetch)
        peak.append(sum(1 for k, f in engine.inflight.items() if k not in engine.prefetched and not f.done()))
        return fut

    engine._submit = counting
    got = decode_logits(lm, ids, prefill=8)
    lm.close()
    assert peak and max(peak) == 1 and engine.stats.misses > 4
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_resident_holds_fp16_for_the_kernels_and_fp32_copies_without(model_and_store, monkeypatch):
    """Fully resident experts stay fp16 when the expert kernels read them directly; without the kernels
    each is converted once at load (no per-token upcast), and the budget counts the fp32 bytes."""
    from edgeopt.moe import kernels

    _, store = model_and_store
    for have_kernels, dtype, factor in ((True, torch.float16, 1), (False, torch.float32, 2)):
        if not have_kernels:
            monkeypatch.setattr(kernels, "library", lambda: None)
        assert kernels.available() is have_kernels
        lm = OffloadedLM(store, "resident")
        entries = list(lm.engine.cache.high.entries.values())
        assert len(entries) == lm.store.n_layers * lm.store.n_experts
        assert all(e.gate_up.dtype == dtype and e.down.dtype == dtype for e in entries)
        assert lm.engine.cache.used == factor * lm.store.total_bytes("fp16") == lm.engine.budget
        lm.close()


def test_rope_tables_cached_while_decoding_still_train():
    """The engine decodes under torch.inference_mode; RoPE tables it caches are reused by training."""
    from edgeopt.models.moe import _rope

    x = torch.randn(1, 2, 5, 8)
    with torch.inference_mode():
        decoded = _rope(x, 0, 12345.0)
    w = torch.randn(1, 2, 5, 8, requires_grad=True)
    trained = _rope(w * 1.0, 0, 12345.0)
    trained.sum().backward()
    assert w.grad is not None and torch.allclose(trained.detach(), _rope(w.detach(), 0, 12345.0))
    assert decoded.shape == x.shape
