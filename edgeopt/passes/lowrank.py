"""`lowrank` pass: truncated-SVD factorization W ≈ (U√Σ)(√Σ Vᵀ) of linear layers.

Rank ratio ρ means a factorized layer keeps about ρ of its parameters:
r = floor(ρ · in·out / (in + out)). A layer is replaced only when the
factorized form has fewer parameters than the original.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from pydantic import Field
from torch import nn

from edgeopt.artifact import EDITS, ModelArtifact
from edgeopt.evaluate import count_params
from edgeopt.passes import Pass, PassConfig, PassContext, register_pass


class FactorizedLinear(nn.Module):
    """y = second(first(x)): a rank-r replacement for nn.Linear(in, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.out_features


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out×r, r×in) factors whose product is the best rank-r approximation of `weight`."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def factorize_linear(layer: nn.Linear, rank: int) -> FactorizedLinear:
    new = FactorizedLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
    left, right = svd_factors(layer.weight, rank)
    with torch.no_grad():
        new.first.weight.copy_(right)
        new.second.weight.copy_(left)
        if layer.bias is not None:
            new.second.bias.copy_(layer.bias)
    return new


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    return max(1, int(ratio * in_features * out_features / (in_features + out_features)))


def saves_params(in_features: int, out_features: int, rank: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


@EDITS.register("lowrank")
def replay_lowrank(model: nn.Module, edit: dict[str, Any]) -> None:
    """Rebuild the factorized structure recorded by the pass (weights load afterwards)."""
    for path, rank in edit["ranks"].items():
        layer = model.get_submodule(path)
        _set_module(model, path, FactorizedLinear(layer.in_features, layer.out_features, rank, layer.bias is not None))


class LowRankConfig(PassConfig):
    rank_ratio: float = Field(0.5, gt=0, le=1, description="fraction of each layer's parameters kept")
    include: list[str] = Field(["*"], description="glob patterns of module paths to consider")
    exclude: list[str] = Field([], description="glob patterns of module paths to leave alone")
    min_features: int = Field(8, ge=1, description="skip layers narrower than this")


@register_pass
class LowRankPass(Pass):
    name = "lowrank"
    Config = LowRankConfig
    config: LowRankConfig

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        model = copy_module(artifact)  # the previous step's module stays intact (the teacher)
        before = count_params(model)
        ranks: dict[str, int] = {}
        for path, layer in list(model.named_modules()):
            if not isinstance(layer, nn.Linear) or not self._selected(path):
                continue
            if min(layer.in_features, layer.out_features) < self.config.min_features:
                continue
            rank = rank_for_ratio(layer.in_features, layer.out_features, self.config.rank_ratio)
            if saves_params(layer.in_features, layer.out_features, rank):
                _set_module(model, path, factorize_linear(layer, rank))
                ranks[path] = rank
        ctx.metrics.update(
            params_before=before, params_after=count_params(model), factorized_layers=ranks
        )
        edits = [*artifact.edits, {"edit": "lowrank", "ranks": ranks}] if ranks else artifact.edits
        return artifact.with_module(model, ctx.step_dir / "model.safetensors", edits)

    def _selected(self, path: str) -> bool:
        match = lambda patterns: any(fnmatch.fnmatchcase(path, p) for p in patterns)  # noqa: E731
        return match(self.config.include) and not match(self.config.exclude)


def copy_module(artifact: ModelArtifact) -> nn.Module:
    """A fresh copy of a torch artifact's model, so a pass never mutates its input."""
    from edgeopt.artifact import build_structure

    clone = build_structure(artifact.source, artifact.edits)
    clone.load_state_dict(artifact.load_module().state_dict(), strict=True)
    return clone.eval()
