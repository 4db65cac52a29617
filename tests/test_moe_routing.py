"""Routing statistics, and the generated scale model's routing (token-dependent, skewed, as promised)."""

from __future__ import annotations

import pytest
import torch

from edgeopt.models.moe import MoEConfig, MoELM
from edgeopt.moe.corpus import word_ids
from edgeopt.moe.routing import routing_stats
from edgeopt.moe.synth import RoutingSpec, simulate_routing, write_random_checkpoint

TINY = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, num_experts=16, num_experts_per_tok=4,
            moe_intermediate_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
            hidden_act="silu", rms_norm_eps=1e-6)


def test_routing_stats_of_a_known_trace():
    def tok(*experts):
        return [[(e, 1 / len(experts)) for e in experts]]  # one layer

    trace = [[tok(0, 1), tok(0, 2), tok(0, 2), tok(3, 1)]]  # 4 experts, top-2
    (layer,) = routing_stats(trace, n_experts=4)
    assert layer.switch_rate == pytest.approx(3 / 6)  # 1 new, then 0, then 2 of 2 new
    assert layer.top_share == pytest.approx(3 / 8)  # expert 0 took 3 of 8 slots
    assert layer.reuse_lift == pytest.approx(0.5 / 0.5) and layer.top_lift == pytest.approx(1.5)


def test_generated_routing_is_skewed_and_token_dependent():
    cfg = TINY | dict(vocab_size=32000, num_experts=64, num_experts_per_tok=8)  # the scale model's vocabulary and routing
    ids = word_ids("heldout", cfg["vocab_size"])
    seqs = [ids[i : i + 256] for i in range(0, 16 * 14000, 14000)]
    flat = routing_stats(simulate_routing(cfg, RoutingSpec(zipf=0.0), seqs), 64)
    skewed = routing_stats(simulate_routing(cfg, RoutingSpec(zipf=1.0), seqs), 64)
    for a, b in zip(flat, skewed, strict=True):
        assert b.top_share > a.top_share and b.switch_rate < a.switch_rate  # popularity skew → more reuse
        assert 0.3 < b.switch_rate < 0.95  # still token-dependent: experts change from token to token
    default = routing_stats(simulate_routing(cfg, RoutingSpec(), seqs), 64)
    assert all(1.5 < r.reuse_lift < 2.0 for r in default), [r.reuse_lift for r in default]  # moe-lm: 1.76


def test_generated_model_routes_as_simulated(tmp_path):
    """The real (transformers) model built from the checkpoint routes mostly as the construction says:
    its router input is dominated by the current token's embedding."""
    transformers = pytest.importorskip("transformers")
    write_random_checkpoint(TINY, tmp_path, shard_bytes=1 << 20, routing=RoutingSpec())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = word_ids("heldout", TINY["vocab_size"])[:64]
    picked = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, n=n: picked.__setitem__(n, o[-1]))
             for n, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids[None])
    for h in hooks:
        h.remove()
    sim = simulate_routing(TINY, RoutingSpec(), [ids])[0]
    for layer, index in picked.items():
        real = index.reshape(64, -1).tolist()
        agree = sum(len(set(r) & {e for e, _ in s[layer]}) for r, s in zip(real, sim, strict=True)) / (64 * 4)
        assert agree > 0.7, (layer, agree)


def test_kv_buffer_grows_past_its_capacity():
    torch.manual_seed(0)
    model = MoELM(MoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, d_ff=32)).eval()
    ids = torch.randint(0, 256, (1, 80))
    with torch.no_grad():
        ref, _ = model(ids)
        logits, cache = model(ids[:, :10])
        steps = [logits]
        for i in range(10, 80):  # the 64-slot buffers grow
            logits, cache = model(ids[:, i : i + 1], cache)
            steps.append(logits)
    assert cache[0].length == 80 and cache[0].k.shape[2] >= 80
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=1e-5)
