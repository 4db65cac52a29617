"""Random-weight checkpoints built from a real architecture's config, written shard by shard.

No model hub is reachable, and a real MoE checkpoint is tens of GB, so the scale benchmark and
the packing tests need checkpoints made here: the tensor names and shapes come from the
architecture's own transformers class (a meta-device skeleton), on disk in the layout
`save_pretrained` writes (per-expert tensors, Mixtral's `block_sparse_moe`), in shards with a
`model.safetensors.index.json`. Weights are N(0, 1/fan_in) so activations keep their scale
through the layers (routing is then spread over the experts, as in a trained model's average);
norms are 1. Memory: one shard at a time.

Random routers alone give an unrealistic workload: every layer adds an output much larger than a
random token embedding, so the router input is dominated by a slowly varying sum of layer outputs
and nearly the same experts win every token (an LRU cache of 25% of the experts hit 80% of uses).
`RoutingSpec` builds the embedding and router weights instead, so that routing is token-dependent
and skewed as in a trained MoE: the router input is mostly the current token's embedding
(`embed_gain`), each token has its own random preference over experts (`sharpness`), and the
experts of a layer have a Zipf-like popularity (`zipf`). The defaults were chosen so that on real
text (word tokens of the Python standard library, `corpus.word_ids`) consecutive tokens reuse
experts 1.6-1.8x as often as random routing would (the trained moe-lm measured 1.76x on held-out
text, `routing.routing_stats`; Mixtral's paper, arXiv 2401.04088 sec. 5, reports its first-choice
expert repeating for consecutive tokens at 1.1-2.2x the random rate, layer dependent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgeopt.fileio import write_json

# Scaled-down configs of real models (architecture and proportions kept; sizes fit this host).
SCALE_CONFIGS: dict[str, dict] = {
    # Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts top-8 of width 768, GQA 32/4, head_dim 128.
    "qwen3-moe-2g": dict(
        model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=8, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
        vocab_size=32000, norm_topk_prob=True, rope_theta=1000000.0, max_position_embeddings=4096,
        tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6,
    ),
}


@dataclass(frozen=True)
class RoutingSpec:
    """How the generated embedding and routers route (see the module docstring)."""

    zipf: float = 0.4  # expert of popularity rank r (random per layer) gets router logit bias -zipf·ln(r + 1)
    sharpness: float = 1.5  # std of a token's own router logits
    embed_gain: float = 8.0  # embedding norm / sqrt(hidden): the layers' outputs are ~1 per element


def routed_weights(config: dict, spec: RoutingSpec, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(token embedding (V, H), one router weight (E, H) per MoE layer) built so that, with the router
    input ≈ RMSNorm(embedding), the logit of expert e for token t is sharpness·n(t, e) + bias(e), with
    n ~ N(0, 1) independent per (token, layer, expert) and bias(e) = -zipf·ln(popularity rank + 1).

    Construction: a shared unit direction u; token parts z_t (unit, ⟂ u) and router parts r_e
    (N(0, 1) entries, ⟂ u), embedding = gain·√H·(z_t + u)/√2, so RMSNorm(embedding) = √(H/2)·(z_t + u)
    and the router row (sharpness·r_e + bias(e)·u)/√(H/2) gives exactly the logit above.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    n_experts = config.get("num_experts") or config.get("num_local_experts") or config["n_routed_experts"]
    u = torch.randn(hidden, generator=gen)
    u /= u.norm()

    def orthogonal(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ u)[..., None] * u

    z = orthogonal(torch.randn(vocab, hidden, generator=gen))
    z /= z.norm(dim=-1, keepdim=True)
    embed = (z + u) * (spec.embed_gain * hidden**0.5 / 2**0.5)
    gates = []
    for _ in range(config["num_hidden_layers"]):
        rank = torch.randperm(n_experts, generator=gen).float()
        bias = -spec.zipf * torch.log1p(rank)
        rows = spec.sharpness * orthogonal(torch.randn(n_experts, hidden, generator=gen)) + bias[:, None] * u
        gates.append(rows / (hidden / 2) ** 0.5)
    return embed, gates


def simulate_routing(config: dict, spec: RoutingSpec, sequences: list[torch.Tensor], seed: int = 1) -> list:
    """The routing trace (`routing.Trace`) these weights give when the router input is exactly the token's
    normalized embedding: what the construction promises, without running the model."""
    embed, gates = routed_weights(config, spec, seed)
    top_k = config["num_experts_per_tok"]
    trace = []
    for ids in sequences:
        x = F.rms_norm(embed[ids], (embed.shape[1],))
        per_layer = []
        for gate in gates:
            w, e = (x @ gate.T).softmax(-1).topk(top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            per_layer.append([list(zip(er, wr, strict=True)) for er, wr in zip(e.tolist(), w.tolist(), strict=True)])
        trace.append([[per_layer[layer][t] for layer in range(len(gates))] for t in range(len(ids))])
    return trace


def _disk_names(name: str, shape: tuple[int, ...], model_type: str) -> list[tuple[str, tuple[int, ...], int | None, str]]:
    """On-disk (name, shape, expert row, part) for one skeleton tensor: stacked experts become per-expert tensors."""
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        prefix = name.rsplit(".", 1)[0]
        if model_type == "mixtral":
            prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
            parts = {"gate": "w1", "up": "w3", "down": "w2"}
        else:
            parts = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        experts, rows, cols = shape
        if name.endswith("gate_up_proj"):
            return [(f"{prefix}.{e}.{parts[p]}.weight", (rows // 2, cols), e, p) for e in range(experts) for p in ("gate", "up")]
        return [(f"{prefix}.{e}.{parts['down']}.weight", (rows, cols), e, "down") for e in range(experts)]
    if model_type == "mixtral":
        name = name.replace(".mlp.", ".block_sparse_moe.")
    return [(name, shape, None, "")]


def write_random_checkpoint(config: dict, out: Path, shard_bytes: int = 512 << 20, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, progress=None, routing: RoutingSpec | None = None) -> Path:
    """Write config.json + sharded random weights for `config` (a transformers config dict) to `out`;
    with `routing`, the embedding and routers come from `routed_weights` (the rest stays random)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = CONFIG_MAPPING[config["model_type"]](**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    tensors = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    tensors += [(n, tuple(b.shape)) for n, b in skeleton.named_buffers()
                if n.endswith("e_score_correction_bias")]  # persistent buffers a checkpoint carries
    gen = torch.Generator().manual_seed(seed)
    routed: dict[str, torch.Tensor] = {}
    if routing is not None:
        embed, gates = routed_weights(config, routing, seed + 1)
        routers = [n for n, shape in tensors if n.endswith(".gate.weight") and shape[0] == gates[0].shape[0]]
        routed = {"model.embed_tokens.weight": embed, **dict(zip(routers, gates, strict=True))}
    shard: dict[str, torch.Tensor] = {}
    shard_size, shards, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_size = {}, 0
            if progress:
                progress(len(shards))

    for name, shape in tensors:
        for disk_name, disk_shape, _, _ in _disk_names(name, shape, config["model_type"]):
            if name in routed:
                value = routed[name].to(dtype)
            elif len(disk_shape) == 1:
                value = (torch.zeros if "bias" in disk_name else torch.ones)(disk_shape, dtype=dtype)
            else:
                value = torch.randn(disk_shape, generator=gen, dtype=dtype).mul_(disk_shape[-1] ** -0.5)
            if shard_size + value.numel() * value.element_size() > shard_bytes:
                flush()
            shard[disk_name] = value
            shard_size += value.numel() * value.element_size()
    flush()
    total = sum((out / s).stat().st_size for s in shards)
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    (out / "config.json").write_text(json.dumps(hf_config.to_dict(), indent=2))
    return out
