"""Find MoE blocks in a model, read their experts, and swap in offloaded experts.

Two expert layouts are understood:

- fused 3-D tensors (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)):
  transformers >= 5 Mixtral / Qwen2-MoE / OLMoE and `edgeopt.models.moe`. Only the
  `experts` module is replaced; the model's own router still runs.
- per-expert modules (`experts` = ModuleList of MLPs with `w1/w3/w2` (Mixtral) or
  `gate_proj/up_proj/down_proj` (Qwen2-MoE, OLMoE)), as in transformers 4.x and many
  remote-code models. Their blocks loop over the ModuleList themselves, so the whole
  block becomes a `RoutedBlock` that routes the way the originals do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.errors import InputError

ExpertPair = tuple[torch.Tensor, torch.Tensor]  # gate_up (2I, H), down (H, I)

_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _is_fused(experts: nn.Module) -> bool:
    return isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and isinstance(
        getattr(experts, "down_proj", None), torch.Tensor
    )


def _per_expert_names(expert: nn.Module) -> tuple[str, str, str] | None:
    for names in _PER_EXPERT_NAMES:
        if all(isinstance(getattr(expert, n, None), nn.Linear) for n in names):
            return names
    return None


def is_moe_block(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if gate is None or experts is None or getattr(gate, "weight", None) is None or gate.weight.dim() != 2:
        return False
    if _is_fused(experts):
        return True
    return isinstance(experts, nn.ModuleList) and len(experts) > 0 and _per_expert_names(experts[0]) is not None


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = [(name, m) for name, m in model.named_modules() if is_moe_block(m)]
    if not blocks:
        raise InputError(f"no MoE blocks found in {type(model).__name__} (expected modules with .gate and .experts)")
    return blocks


def extract_experts(block: nn.Module) -> list[ExpertPair]:
    experts = block.experts
    if _is_fused(experts):
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        hidden = block.gate.weight.shape[1]
        if gate_up.dim() != 3 or gate_up.shape[2] != hidden or down.shape[1] != hidden:
            raise InputError(f"unsupported fused expert layout {tuple(gate_up.shape)} / {tuple(down.shape)}")
        return [(gate_up[e], down[e]) for e in range(gate_up.shape[0])]
    out = []
    for expert in experts:
        g, u, d = (getattr(expert, n).weight.detach() for n in _per_expert_names(expert))
        out.append((torch.cat([g, u]), d))
    return out


def router_settings(block: nn.Module) -> tuple[int, bool]:
    """(top_k, renormalize top-k weights) as the original block routes."""
    gate = block.gate
    top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None) or getattr(block, "num_experts_per_tok", None)
    if top_k is None:
        raise InputError(f"cannot tell top-k of MoE block {type(block).__name__}")
    normalize = getattr(gate, "norm_topk_prob", getattr(block, "norm_topk_prob", True))
    return int(top_k), bool(normalize)


class RoutedBlock(nn.Module):
    """Router + offloaded experts (+ Qwen2-MoE's gated shared expert) for per-expert-layout blocks."""

    def __init__(self, original: nn.Module, experts: nn.Module) -> None:
        super().__init__()
        self.top_k, self.normalize = router_settings(original)
        self.gate = original.gate
        self.experts = experts
        self.shared_expert = getattr(original, "shared_expert", None)
        self.shared_expert_gate = getattr(original, "shared_expert_gate", None)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = F.linear(x, self.gate.weight)
        weights, index = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = self.experts(x, index, weights.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape)


def install(model: nn.Module, make_experts) -> list[torch.Tensor]:
    """Replace every MoE block's experts with `make_experts(layer_index)`; returns the gate weights."""
    gates = []
    for layer, (name, block) in enumerate(find_moe_blocks(model)):
        gates.append(block.gate.weight)
        replacement = make_experts(layer)
        if _is_fused(block.experts):
            block.experts = replacement
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, RoutedBlock(block, replacement))
    return gates


def expert_param_names(model: nn.Module) -> set[str]:
    """State-dict names of every expert weight (what the store holds instead of memory)."""
    names = set()
    for name, block in find_moe_blocks(model):
        for pname, _ in block.experts.named_parameters():
            names.add(f"{name}.experts.{pname}" if name else f"experts.{pname}")
    return names
