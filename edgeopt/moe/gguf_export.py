"""Write a moe-lm checkpoint as GGUF, so llama.cpp can run the same model side by side.

llama.cpp's `llama` architecture with experts is Mixtral's graph: RMSNorm → attention with
RoPE → RMSNorm → softmax router, top-k, renormalized → SwiGLU experts, which is moe-lm's.
Layout (llama.cpp's own converter's): experts stacked per layer as `blk.N.ffn_{gate,up}_exps`
(n_expert, n_ff, n_embd) and `ffn_down_exps` (n_expert, n_embd, n_ff), router `ffn_gate_inp`,
and q/k rows permuted from the rotate-half RoPE layout (moe-lm, HF Llama) to llama.cpp's
interleaved pairs. Byte-level vocabulary: 256 byte tokens `<0xNN>`, so token ids are the bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeopt.errors import InputError
from edgeopt.fileio import write_with


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order to interleaved pairs (llama.cpp's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(checkpoint: Path, out: Path, dtype: str = "f16") -> Path:
    try:
        import gguf
    except ImportError as exc:
        raise InputError("export-gguf needs the gguf package: pip install gguf") from exc
    from edgeopt.moe.models import load_source

    model, info = load_source(Path(checkpoint))
    if info["kind"] != "moe-lm":
        raise InputError("export-gguf writes moe-lm checkpoints (HF models: use llama.cpp's convert_hf_to_gguf.py)")
    cfg = model.cfg
    head_dim = cfg.d_model // cfg.n_heads
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]

    def matrix(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy().astype(np_dtype)

    def vector(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy().astype(np.float32)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name("moe-lm")
        w.add_context_length(cfg.max_seq)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_heads)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.top_k)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        _vocab(w, gguf, cfg.vocab_size)
        w.add_tensor("token_embd.weight", matrix(model.embed.weight))
        d = cfg.d_model
        for i, layer in enumerate(model.layers):
            qkv = layer.attn.qkv.weight
            w.add_tensor(f"blk.{i}.attn_norm.weight", vector(layer.attn_norm.weight))
            w.add_tensor(f"blk.{i}.attn_q.weight", matrix(permute_rope(qkv[:d], cfg.n_heads)))
            w.add_tensor(f"blk.{i}.attn_k.weight", matrix(permute_rope(qkv[d : 2 * d], cfg.n_heads)))
            w.add_tensor(f"blk.{i}.attn_v.weight", matrix(qkv[2 * d :]))
            w.add_tensor(f"blk.{i}.attn_output.weight", matrix(layer.attn.out.weight))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", vector(layer.moe_norm.weight))
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", vector(layer.moe.gate.weight))
            experts = layer.moe.experts
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", matrix(experts.gate_up_proj[:, : cfg.d_ff]))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", matrix(experts.gate_up_proj[:, cfg.d_ff :]))
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight", matrix(experts.down_proj))
        w.add_tensor("output_norm.weight", vector(model.norm.weight))
        w.add_tensor("output.weight", matrix(model.lm_head.weight))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return write_with(Path(out), write)


def _vocab(w, gguf, n: int) -> None:
    """An SPM vocabulary whose first 256 tokens are the bytes; the rest are placeholder pieces
    (the models exported here are fed token ids, never text)."""
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<0x{i:02X}>".encode() if i < 256 else f"<t{i}>".encode() for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([gguf.TokenType.BYTE if i < 256 else gguf.TokenType.NORMAL for i in range(n)])
    w.add_bos_token_id(ord("\n"))
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export_gguf_qwen3_moe(directory: Path, out: Path) -> Path:
    """A local Qwen3-MoE checkpoint (e.g. the scale benchmark's random-weight one) as F16 GGUF,
    read tensor by tensor; Qwen's RoPE is llama.cpp's NEOX type, so q/k are not permuted."""
    import json

    import gguf

    from edgeopt.moe.sharded import ShardedCheckpoint

    cfg = json.loads((Path(directory) / "config.json").read_text())
    if cfg.get("model_type") != "qwen3_moe":
        raise InputError(f"{directory}: GGUF export of HF models covers qwen3_moe only (got {cfg.get('model_type')!r})")
    ckpt = ShardedCheckpoint(Path(directory))

    def f16(name: str) -> np.ndarray:
        return ckpt.read(name).float().numpy().astype(np.float16)

    def f32(name: str) -> np.ndarray:
        return ckpt.read(name).float().numpy()

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "qwen3moe")
        n_layers, n_experts = cfg["num_hidden_layers"], cfg.get("num_experts", cfg.get("num_local_experts"))
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        _vocab(w, gguf, cfg["vocab_size"])
        w.add_tensor("token_embd.weight", f16("model.embed_tokens.weight"))
        for i in range(n_layers):
            p = f"model.layers.{i}"
            for src, dst in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                             ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")):
                w.add_tensor(f"blk.{i}.{dst}.weight", f32(f"{p}.{src}.weight"))
            for src, dst in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
                w.add_tensor(f"blk.{i}.{dst}.weight", f16(f"{p}.self_attn.{src}.weight"))
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", f32(f"{p}.mlp.gate.weight"))
            for src, dst in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
                w.add_tensor(f"blk.{i}.{dst}.weight", np.stack([f16(f"{p}.mlp.experts.{e}.{src}.weight") for e in range(n_experts)]))
        w.add_tensor("output_norm.weight", f32("model.norm.weight"))
        w.add_tensor("output.weight", f16("lm_head.weight"))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    try:
        return write_with(Path(out), write)
    finally:
        ckpt.close()
