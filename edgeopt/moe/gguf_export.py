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
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<0x{i:02X}>".encode() for i in range(cfg.vocab_size)])
        w.add_token_scores([0.0] * cfg.vocab_size)
        w.add_token_types([gguf.TokenType.BYTE] * cfg.vocab_size)
        w.add_bos_token_id(ord("\n"))
        w.add_eos_token_id(0)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
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
