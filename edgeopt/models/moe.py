"""A Mixtral-style sparse MoE decoder LM: RoPE attention, top-k router, SwiGLU experts.

The layout deliberately matches transformers' Mixtral (fused 3-D expert tensors
`gate_up_proj` (E, 2·d_ff, d) and `down_proj` (E, d, d_ff), a bias-free router,
top-k softmax renormalised) so the offloading runtime treats both the same way:
it swaps each block's `experts` module for one that fetches weights on demand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.models import register_model


class KVBuffer:
    """One layer's keys and values in preallocated buffers (B, heads, capacity, head_dim).

    Appending writes into the buffer (capacity doubles when full, so a sequence costs O(log n)
    reallocations) instead of `torch.cat`-ing the whole cache every decoded token, which copies
    the cache and allocates fresh memory each step. The state is updated in place: decode a
    sequence linearly (a second branch from the same state needs its own `clone`).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int = 64) -> None:
        capacity = max(capacity, k.shape[2])
        b, h, _, d = k.shape
        self.k = k.new_empty(b, h, capacity, d)
        self.v = v.new_empty(b, h, capacity, v.shape[-1])
        self.length = 0
        self.append(k, v)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `t` new positions; the keys and values of every position so far (views)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            grow = max(end, 2 * self.k.shape[2])
            self.k = torch.cat([self.k[:, :, : self.length], self.k.new_empty(*self.k.shape[:2], grow - self.length, self.k.shape[3])], 2)
            self.v = torch.cat([self.v[:, :, : self.length], self.v.new_empty(*self.v.shape[:2], grow - self.length, self.v.shape[3])], 2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def clone(self) -> KVBuffer:
        other = KVBuffer.__new__(KVBuffer)
        other.k, other.v, other.length = self.k.clone(), self.v.clone(), self.length
        return other


KVCache = list[KVBuffer]


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    max_seq: int = 1024
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)); gate and up are stacked rows of `gate_up`."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class Experts(nn.Module):
    """All experts of one layer as fused tensors; called as experts(x, top_k_index, top_k_weights)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(cfg.n_experts, 2 * cfg.d_ff, cfg.d_model) * cfg.d_model**-0.5)
        self.down_proj = nn.Parameter(torch.randn(cfg.n_experts, cfg.d_model, cfg.d_ff) * cfg.d_ff**-0.5)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            y = swiglu_expert(x[token], self.gate_up_proj[e], self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        self.last_router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        # Top-k of the logits, then softmax over those k: the renormalized top-k probabilities
        # in two ops instead of four (decoding one token is dominated by per-op overhead).
        top, index = logits.float().topk(self.top_k, dim=-1)
        weights = top.softmax(-1)
        self.last_router_logits = logits
        return self.experts(flat, index, weights).reshape(shape)


@lru_cache(maxsize=8)
def _rope_table(theta: float, half: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin per position, each repeated for both halves (so rotating is two multiplies).
    Made outside inference mode: the cached tables are shared with training, and autograd refuses
    inference tensors (the engine decodes under `torch.inference_mode`)."""
    with torch.inference_mode(False):
        freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
        ang = torch.arange(length, dtype=torch.float32)[:, None] * freqs[None]
        return ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)


def _rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) for x (..., T, Dh) at positions start .. start+T-1.

    x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1]: the same arithmetic as
    [x1·cos − x2·sin, x2·cos + x1·sin] in 5 tensor ops instead of 9 (decoding one token is
    dominated by per-op overhead)."""
    half, t = x.shape[-1] // 2, x.shape[-2]
    length = 1 << max(10, (start + t - 1).bit_length())  # tables grow in powers of two, then stay cached
    cos, sin = (m[start : start + t] for m in _rope_table(theta, half, length))
    if cos.dtype != x.dtype or cos.device != x.device:
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
    return torch.addcmul(x * cos, torch.cat([-x[..., half:], x[..., :half]], dim=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, start: int, cache: KVBuffer | None) -> tuple[torch.Tensor, KVBuffer]:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(qkv[:2], start, self.theta)  # q and k rotated in one pass
        v = qkv[2]
        if cache is None:
            cache = KVBuffer(k, v)
        else:
            k, v = cache.append(k, v)
        # Causal within the new chunk; every cached position is visible.
        mask = None
        if t > 1:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), cache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = Attention(cfg)
        self.moe_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.moe = MoEBlock(cfg)

    def forward(self, x: torch.Tensor, start: int, cache):
        a, kv = self.attn(self.attn_norm(x), start, cache)
        x = x + a
        return x + self.moe(self.moe_norm(x)), kv


class MoELM(nn.Module):
    """Byte-level causal LM; `forward(ids, cache)` returns (logits, new cache) for incremental decoding."""

    def __init__(self, cfg: MoEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MoEConfig()
        self.embed = nn.Embedding(self.cfg.vocab_size, self.cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(self.cfg) for _ in range(self.cfg.n_layers))
        self.norm = nn.RMSNorm(self.cfg.d_model, eps=1e-6)
        self.lm_head = nn.Linear(self.cfg.d_model, self.cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.moe for layer in self.layers]

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        start = 0 if not cache else cache[0].length
        x = self.embed(ids)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, start, cache[i] if cache else None)
            new_cache.append(kv)
        return self.lm_head(self.norm(x)), new_cache


@register_model("moe-lm")
def moe_lm(**kwargs) -> MoELM:
    return MoELM(MoEConfig(**kwargs))
