"""GGUF export of moe-lm: llama.cpp's tensor layout, and q/k rows permuted for its RoPE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

from edgeopt.models.moe import MoEConfig, MoELM, _rope  # noqa: E402
from edgeopt.moe.gguf_export import export_gguf, permute_rope  # noqa: E402

CFG = MoEConfig(d_model=64, n_layers=2, n_heads=4, n_experts=4, d_ff=96)


def rope_interleaved(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp's 'normal' RoPE: rotate pairs (2i, 2i+1) by pos * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    ang = pos * theta ** (-torch.arange(half, dtype=torch.float32) / half)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_permuted_q_under_interleaved_rope_equals_moe_lm_rope():
    torch.manual_seed(0)
    n_head, head_dim, d = 4, 16, 64
    w, x = torch.randn(n_head * head_dim, d), torch.randn(d)
    for pos in (0, 3, 17):
        ours = _rope((w @ x).view(n_head, 1, head_dim), pos, 10000.0).view(n_head, head_dim)
        theirs = rope_interleaved((permute_rope(w, n_head) @ x).view(n_head, head_dim), pos, 10000.0)
        # Same scores: q·k is invariant under the same row permutation of q and k.
        perm = permute_rope(torch.arange(n_head * head_dim, dtype=torch.float32)[:, None], n_head).view(n_head, head_dim).long()
        torch.testing.assert_close(theirs, ours.reshape(-1)[perm], atol=1e-5, rtol=1e-5)


def test_export_writes_llama_cpp_layout(tmp_path):
    torch.manual_seed(0)
    model = MoELM(CFG)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"config": json.dumps(CFG.to_dict())})
    path = export_gguf(tmp_path / "m.safetensors", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 10 * CFG.n_layers
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 96, 4]  # ggml order: n_embd, n_ff, n_expert
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [96, 64, 4]
    assert list(tensors["blk.0.ffn_gate_inp.weight"].shape) == [64, 4]
    up = np.asarray(tensors["blk.1.ffn_up_exps.weight"].data).reshape(4, 96, 64)
    np.testing.assert_array_equal(up, state["layers.1.moe.experts.gate_up_proj"][:, 96:].numpy())
    k = np.asarray(tensors["blk.0.attn_k.weight"].data).reshape(64, 64)
    np.testing.assert_array_equal(k, permute_rope(state["layers.0.attn.qkv.weight"][64:128].float(), 4).half().numpy())
    fields = {f.name: f for f in reader.fields.values()}
    assert int(fields["llama.expert_count"].parts[-1][0]) == 4 and int(fields["llama.expert_used_count"].parts[-1][0]) == 2


def test_qwen3_moe_directory_exports_stacked_experts(tmp_path):
    from edgeopt.moe.gguf_export import export_gguf_qwen3_moe
    from edgeopt.moe.synth import write_random_checkpoint

    config = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=48, num_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    src = write_random_checkpoint(config, tmp_path / "q", shard_bytes=20_000)
    reader = gguf.GGUFReader(str(export_gguf_qwen3_moe(src, tmp_path / "q.gguf")))
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [48, 32, 4]
    assert list(tensors["blk.0.attn_k_norm.weight"].shape) == [8]
    from safetensors.torch import load_file

    state = {}
    for f in src.glob("model-*.safetensors"):
        state |= load_file(str(f))
    gate = np.asarray(tensors["blk.1.ffn_gate_exps.weight"].data).reshape(4, 48, 32)
    np.testing.assert_array_equal(gate[2], state["model.layers.1.mlp.experts.2.gate_proj.weight"].half().numpy())
