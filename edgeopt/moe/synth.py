"""Random-weight checkpoints built from a real architecture's config, written shard by shard.

No model hub is reachable, and a real MoE checkpoint is tens of GB, so the scale benchmark and
the packing tests need checkpoints made here: the tensor names and shapes come from the
architecture's own transformers class (a meta-device skeleton), on disk in the layout
`save_pretrained` writes (per-expert tensors, Mixtral's `block_sparse_moe`), in shards with a
`model.safetensors.index.json`. Weights are N(0, 1/fan_in) so activations keep their scale
through the layers (routing is then spread over the experts, as in a trained model's average);
norms are 1. Memory: one shard at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
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
                            dtype: torch.dtype = torch.bfloat16, progress=None) -> Path:
    """Write config.json + sharded random weights for `config` (a transformers config dict) to `out`."""
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
            if len(disk_shape) == 1:
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
