"""`lowrank` pass: truncated-SVD factorization of nn.Linear, 1x1 convolutions and SS2D (Low-Rank SS2D).

Inside VMamba's SS2D it factorizes `in_proj`, `out_proj`, `x_proj_weight` and `dt_projs_weight`
(per scan direction) and the state matrix `A_logs` ((K d_inner) x N, A = -exp(U V)), keeping the
transition input-dependent through delta (DLRMamba's Low-Rank SS2D). Part `state` first truncates
the scan's state dimension N to the modes that carry most of the output energy on calibration data
(the scan's cost is linear in N, so this is what makes the block faster; the distill pass maps
teacher states onto the kept modes). A target is replaced only when its factors have fewer
parameters. Ranks come from one of:

- `ratio`: every target keeps about `rank_ratio` of its parameters (DLRMamba's 0.65 ... 0.50),
  and ceil(rank_ratio N) state modes;
- `energy`: the smallest rank keeping `energy` of the squared singular values (state: of the
  modes' output energy);
- `budget`: `rank_ratio` of all targets' parameters, spread by sensitivity on calibration data.

`whiten: true` makes the factors (and the energy / sensitivity measures) activation-aware, as in
SVD-LLM: truncation then minimizes the output error on the calibration split.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from edgeopt.artifact import EDITS, ModelArtifact
from edgeopt.evaluate import count_params
from edgeopt.lowrank.factors import rank_for_ratio, saves_params, svd_factors  # noqa: F401  (public API)
from edgeopt.lowrank.modules import FactorizedLinear  # noqa: F401  (public API)
from edgeopt.lowrank.plan import (
    SS2D_PARTS,
    Selection,
    apply_plan,
    factorize,
    find_targets,
    input_grams,
    ranks_by_budget,
    ranks_by_energy,
    ranks_by_ratio,
    state_energies,
    state_ranks,
    state_targets,
)
from edgeopt.passes import Pass, PassConfig, PassContext, register_pass


def factorize_linear(layer: nn.Linear, rank: int) -> FactorizedLinear:
    holder = nn.Sequential(layer)
    factorize(holder, {"0": rank})
    return holder[0]


@EDITS.register("lowrank")
def replay_lowrank(model: nn.Module, edit: dict[str, Any]) -> None:
    """Rebuild the factorized structure recorded by the pass (weights load afterwards)."""
    factorize(model, edit["ranks"], init=False, state_modes=edit.get("state_modes"))


SS2DPart = Literal["state", "in_proj", "out_proj", "x_proj", "dt_proj", "A"]


class LowRankConfig(PassConfig):
    rank_ratio: float = Field(
        0.5, gt=0, le=1, description="parameters kept per layer (ratio) or in all (budget)"
    )
    method: Literal["ratio", "energy", "budget"] = "ratio"
    energy: float = Field(
        0.95, gt=0, le=1, description="share of squared singular values kept (method energy)"
    )
    whiten: bool = Field(False, description="activation-aware factors from the calibration split (SVD-LLM)")
    calib_samples: int = Field(128, ge=1, description="calibration images for whiten / budget")
    include: list[str] = Field(["*"], description="glob patterns of target names to consider")
    exclude: list[str] = Field([], description="glob patterns of target names to leave alone")
    ss2d_only: bool = Field(False, description="factorize only inside SS2D blocks")
    last_blocks: int | None = Field(None, ge=1, description="only the last N SS2D blocks (implies ss2d_only)")
    ss2d_parts: list[SS2DPart] = Field(list(SS2D_PARTS), description="which SS2D weights to factorize")
    min_features: int = Field(8, ge=1, description="skip layers narrower than this")


@register_pass
class LowRankPass(Pass):
    name = "lowrank"
    uses_profile = False  # same result for every hardware profile: shared across profiles
    Config = LowRankConfig
    config: LowRankConfig

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg = self.config
        calib_x = ctx.task.inputs(ctx.splits.calib, cfg.calib_samples)
        scratch = copy_module(artifact)  # plans are made on a copy: the input module stays the teacher
        before = count_params(scratch)
        ranks = plan_ranks(scratch, cfg, calib_x)
        modes = kept_state_modes(scratch)  # picked once, on calibration data, while planning
        model = apply_plan(copy_module(artifact), ranks, calib_x, cfg.whiten, modes)
        ctx.metrics.update(params_before=before, params_after=count_params(model), factorized_layers=ranks)
        # The edit names the kept state modes, so replay and distillation never recompute them.
        edit = {"edit": "lowrank", "ranks": ranks, "state_modes": modes, "whiten": cfg.whiten,
                "calib_samples": cfg.calib_samples}
        edits = [*artifact.edits, edit] if ranks else artifact.edits
        return artifact.with_module(model, ctx.step_dir / "model.safetensors", edits)


def kept_state_modes(model: nn.Module) -> dict[str, list[int]]:
    """`{<block>.state: kept mode indices}` for every SS2D block truncated on calibration data."""
    from edgeopt.lowrank.modules import STATE

    return {f"{name}.{STATE}": [int(i) for i in m.kept_modes] for name, m in model.named_modules()
            if getattr(m, "kept_modes", None) is not None}  # fmt: skip


def selection_of(cfg: LowRankConfig) -> Selection:
    return Selection(
        cfg.include, cfg.exclude, cfg.ss2d_only, cfg.last_blocks, cfg.ss2d_parts, cfg.min_features
    )


def plan_ranks(model: nn.Module, cfg: LowRankConfig, calib_x: torch.Tensor) -> dict[str, int]:
    """{target: rank} for the config. Truncates `model`'s SS2D states in place first (factor ranks
    are planned on the truncated shapes); calibration data only where the method needs it."""
    selection = selection_of(cfg)
    states = state_targets(model, selection)
    state_plan = {}
    if states:
        energies = state_energies(model, states, calib_x)
        energy = cfg.energy if cfg.method == "energy" else None
        state_plan = state_ranks(states, model, cfg.rank_ratio, energy, energies)
        factorize(model, state_plan, energies)
    targets = find_targets(model, selection)
    grams = input_grams(model, targets, calib_x) if cfg.whiten or cfg.method == "budget" else {}
    if cfg.method == "ratio":
        ranks = ranks_by_ratio(targets, cfg.rank_ratio)
    elif cfg.method == "energy":
        ranks = ranks_by_energy(targets, cfg.energy, grams)
    else:
        ranks = ranks_by_budget(targets, cfg.rank_ratio, grams)
    return {**state_plan, **ranks}


def copy_module(artifact: ModelArtifact) -> nn.Module:
    """A fresh copy of a torch artifact's model, so a pass never mutates its input."""
    from edgeopt.artifact import build_structure

    clone = build_structure(artifact.source, artifact.edits)
    clone.load_state_dict(artifact.load_module().state_dict(), strict=True)
    return clone.eval()
