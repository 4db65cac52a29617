"""Hugging Face transformers MoE models (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V2/V3) from a local directory.

The engine replaces only each MoE block's `experts` module (fused 3-D tensors in transformers 5)
and keeps the model's own router, shared experts and their gates, so routing variants
(`norm_topk_prob`, DeepSeek's grouped sigmoid routing with a score bias and a routed scaling
factor, Qwen2-MoE's sigmoid-gated shared expert) run as transformers runs them. What the engine
does assume, `check_config` and the packer refuse in one line: SwiGLU experts with SiLU and no
biases, one expert shape for every MoE layer, unquantized float weights.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeopt.errors import InputError

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def check_config(config: dict, where: str) -> None:
    """Refuse a config the engine does not implement, with one line naming the reason."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise InputError(f"{where}: unsupported model type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{where}: experts with hidden_act {act!r} are not supported (the engine's experts are SwiGLU with SiLU)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise InputError(f"{where}: checkpoint is quantized ({method}); pack the bf16/fp16 checkpoint instead")


def hf_from_config(config_dict: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    check_config(config_dict, "store")
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
