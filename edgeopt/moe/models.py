"""Load a MoE model to pack, and rebuild its expert-less skeleton from a store.

A model source is either the committed `edgeopt.models.moe` checkpoint (a
`.safetensors` file with its config in the metadata) or a local Hugging Face model
directory (config.json + weights; never the hub). The skeleton is built on the
meta device with the experts swapped out *before* any memory is allocated, so a
model whose experts do not fit in memory can still be run from its store.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from edgeopt.errors import InputError
from edgeopt.models.moe import MoEConfig, MoELM
from edgeopt.moe import blocks, kernels


def load_source(path: Path) -> tuple[nn.Module, dict]:
    """(model, model_info) for a moe-lm checkpoint file, in memory (packing streams instead: `packer`)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise InputError(f"model must be a moe-lm .safetensors checkpoint or a local HF model directory: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    if "config" not in meta:
        raise InputError(f"{path} has no moe-lm config in its metadata")
    config = json.loads(meta["config"])
    from edgeopt.models import load_checkpoint

    model = load_checkpoint(MoELM(MoEConfig(**config)), path).float().eval()
    return model, {"kind": "moe-lm", "config": config}


def build_skeleton(model_info: dict) -> nn.Module:
    """The model with no expert weights allocated (experts still need `blocks.install`)."""
    with torch.device("meta"):
        if model_info["kind"] == "moe-lm":
            return MoELM(MoEConfig(**model_info["config"]))
        if model_info["kind"] == "hf":
            from edgeopt.moe.hf import hf_from_config

            return hf_from_config(model_info["config"])
    raise InputError(f"unknown model kind {model_info['kind']!r} in store")


def resident_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-expert parameter and buffer (non-persistent ones too: rotary tables)."""
    skip = blocks.expert_param_names(model)
    state = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if n not in skip}
    state.update({n: b.detach() for n, b in model.named_buffers(remove_duplicate=False)})
    return {k: v.clone().contiguous() for k, v in state.items()}


def materialize(model: nn.Module, state) -> nn.Module:
    """Allocate the skeleton on CPU and fill every parameter/buffer from the resident state
    (a dict or a name → tensor reader: then one tensor is read at a time, and peak memory is the
    model plus one tensor). Linears stored in bf16 become `kernels.CompactLinear`s before anything is
    allocated, so they never exist in fp32 (exact: bf16 → fp32 is the upper half of the bits)."""
    kernels.compact_linears(model, _bf16_names(state))
    model.to_empty(device="cpu")
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    missing = [n for n in tensors if n not in state]
    if missing:
        raise InputError(f"store's resident weights lack {len(missing)} tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            value = state[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise InputError(f"resident weight {name} has shape {tuple(value.shape)}, model wants {tuple(tensor.shape)}")
            tensor.copy_(value)
            del value
    if hasattr(state, "close"):
        state.close()
    return model.eval()


def _bf16_names(state) -> set[str]:
    """Names of the tensors stored in bf16 (from the header of a checkpoint reader, or a dict's dtypes)."""
    if hasattr(state, "entries"):
        return {n for n, e in state.entries.items() if e.dtype == "BF16"}
    return {n for n, t in state.items() if t.dtype == torch.bfloat16}
