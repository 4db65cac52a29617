"""Hugging Face transformers MoE models (Mixtral, Qwen2-MoE, OLMoE) from a local directory.

transformers 5.x stores these models' experts as fused 3-D tensors
(`mlp.experts.gate_up_proj` / `down_proj`) and converts legacy per-expert
checkpoints (`block_sparse_moe.experts.N.w1` ...) at load time, so loading through
`from_pretrained` covers both checkpoint layouts; `blocks` handles both module layouts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeopt.errors import InputError

SUPPORTED = ("mixtral", "qwen2_moe", "olmoe")


def _check_type(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED:
        raise InputError(f"{where}: unsupported model type {model_type!r} (supported: {', '.join(SUPPORTED)})")


def load_hf_model(directory: Path) -> tuple[nn.Module, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise InputError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        _check_type(config.model_type, str(directory))
        if not any(directory.glob("*.safetensors")):  # a pytorch_model.bin is a pickle: it can run code
            raise InputError(f"{directory} has no .safetensors weights (edgeopt never loads pickled .bin checkpoints)")
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                     use_safetensors=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot load Hugging Face model from {directory}: {str(exc).splitlines()[0]}") from exc
    # `source` lets `moe run` find the model's tokenizer.json next to the weights
    return model.eval(), {"kind": "hf", "config": config.to_dict(), "source": str(directory.resolve())}


def hf_from_config(config_dict: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    _check_type(model_type, "store")
    config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
