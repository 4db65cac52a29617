"""Hugging Face MoE adapters: offloaded logits equal transformers' own, for both expert layouts."""

from __future__ import annotations

import pytest
import torch
from moe_fixtures import decode_logits
from torch import nn

transformers = pytest.importorskip("transformers")

from edgeopt.errors import InputError  # noqa: E402
from edgeopt.moe.offload import OffloadedLM, pack, pack_model  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, eos_token_id=0, bos_token_id=1, pad_token_id=None)


def tiny_config(kind: str):
    if kind == "mixtral":
        return transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=48, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=False, **COMMON,
        )
    if kind.startswith("qwen3_moe"):  # norm_topk_prob is the model's own router's business: both settings
        return transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                           norm_topk_prob=kind.endswith("norm"), **COMMON)
    if kind.startswith("deepseek"):  # shared + routed experts, dense first layer, MLA attention
        deepseek = dict(intermediate_size=64, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **(COMMON | {"num_key_value_heads": 4}))
        if kind == "deepseek_v3":  # sigmoid scores + correction bias, grouped top-k, routed scaling factor
            return transformers.DeepseekV3Config(n_group=2, topk_group=1, routed_scaling_factor=2.5, **deepseek)
        return transformers.DeepseekV2Config(**deepseek)
    return transformers.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **COMMON)


def tiny_model(kind: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2).copy_(p.half().float())  # fp16-exact, and routing far from ties
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "qwen3_moe-norm", "deepseek_v2", "deepseek_v3"])
def test_fused_layout_from_local_directory(kind, tmp_path):
    model = tiny_model(kind)
    assert model.model.layers[-1].mlp.experts.gate_up_proj.dim() == 3  # transformers 5: fused experts
    model.save_pretrained(tmp_path / "hf")
    store = pack(tmp_path / "hf", tmp_path / "store", ("fp16", "int4"))
    ids = torch.randint(2, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    lm = OffloadedLM(store, "hobbit", budget_fraction=0.5, t1=1.0, t2=1.0)
    got = decode_logits(lm, ids, prefill=6)
    assert lm.engine.stats.misses > 0
    lm.close()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class LegacyExpert(nn.Module):
    """transformers 4.x MixtralBlockSparseTop2MLP: w1 gate, w3 up, w2 down."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        inter, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
        self.w1, self.w3 = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w1.weight.data, self.w3.weight.data = gate_up[:inter].clone(), gate_up[inter:].clone()
        self.w2.weight.data = down.clone()

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class LegacyBlock(nn.Module):
    """transformers 4.x MixtralSparseMoeBlock: a Linear gate and a ModuleList of experts."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        self.top_k = fused.gate.top_k
        self.gate = nn.Linear(fused.gate.weight.shape[1], fused.gate.weight.shape[0], bias=False)
        self.gate.weight.data = fused.gate.weight.data.clone()
        e = fused.experts
        self.experts = nn.ModuleList(LegacyExpert(e.gate_up_proj[i].data, e.down_proj[i].data) for i in range(e.num_experts))

    def forward(self, h):
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        w, idx = self.gate(x).float().softmax(-1).topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(self.top_k):
                out[t] += w[t, k] * self.experts[int(idx[t, k])](x[t])
        return out.reshape(shape)


def test_per_expert_module_layout(tmp_path):
    model = tiny_model("mixtral")
    ids = torch.randint(2, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    for layer in model.model.layers:
        layer.mlp = LegacyBlock(layer.mlp)
    with torch.no_grad():
        ref = model(ids).logits
    store = pack_model(model, {"kind": "hf", "config": model.config.to_dict()}, tmp_path / "store", ("fp16", "int4"))
    lm = OffloadedLM(store, "lru-fp16", budget_fraction=0.25, model=model)
    assert type(model.model.layers[0].mlp).__name__ == "RoutedBlock"
    assert not any("experts.0" in n for n, _ in model.named_parameters())
    got = decode_logits(lm, ids, prefill=6)
    lm.close()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_not_a_moe_directory_is_input_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError):
        pack(tmp_path, tmp_path / "store")
