"""Which weights to factorize, at which rank, and doing it.

A *target* is one factorizable weight, named by where it lives: a module path for nn.Linear and
1x1 convolutions (`layers.1.blocks.0.op.in_proj`), `<SS2D path>.<param>` for the SS2D
parameters (`layers.1.blocks.0.op.A_logs`). Plans are `{target name: rank}`; the same dict is the
`lowrank` edit that `ModelArtifact` replays to rebuild the structure before loading weights.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from edgeopt.lowrank.factors import rank_for_energy, rank_for_ratio, saves_params, spectrum, svd_factors
from edgeopt.lowrank.modules import (
    SS2D_PARAMS,
    STATE,
    FactorizedConv1x1,
    FactorizedLinear,
    LowRankSS2D,
    as_stack,
    is_conv1x1,
)
from edgeopt.models.ss2d import SS2D

# SS2D parts a user can select, and the target they name inside a block.
SS2D_PARTS = {"state": STATE, "in_proj": "in_proj", "out_proj": "out_proj", "x_proj": "x_proj_weight",
              "dt_proj": "dt_projs_weight", "A": "A_logs"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    weight: torch.Tensor  # (stack, rows, cols); a Linear/conv is a stack of one

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def params(self) -> int:
        return self.weight.numel()

    def factor_params(self, rank: int) -> int:
        stack, rows, cols = self.shape
        return stack * rank * (rows + cols)

    def saves(self, rank: int) -> bool:
        return saves_params(self.shape[1], self.shape[2], rank)


@dataclass(frozen=True)
class Selection:
    """Glob patterns on target names; optionally only SS2D blocks (the last `last_blocks` of them)."""

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    ss2d_only: bool = False
    last_blocks: int | None = None
    ss2d_parts: Sequence[str] = tuple(SS2D_PARTS)
    min_features: int = 8


def ss2d_blocks(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, SS2D)]


def _chosen_blocks(model: nn.Module, selection: Selection) -> list[str]:
    blocks = ss2d_blocks(model)
    return blocks[-selection.last_blocks :] if selection.last_blocks else blocks


def state_targets(model: nn.Module, selection: Selection = Selection()) -> list[str]:
    """`<block>.state` for every selected SS2D block whose state dimension may be truncated."""
    if "state" not in selection.ss2d_parts:
        return []
    names = [f"{b}.{STATE}" for b in _chosen_blocks(model, selection)]
    return [n for n in names if _matches(n, selection.include) and not _matches(n, selection.exclude)]


def find_targets(model: nn.Module, selection: Selection = Selection()) -> list[Target]:
    blocks, chosen = ss2d_blocks(model), _chosen_blocks(model, selection)
    in_block = {f"{b}.{SS2D_PARTS[p]}": b for b in blocks for p in SS2D_PARTS}
    wanted = {f"{b}.{SS2D_PARTS[p]}" for b in chosen for p in selection.ss2d_parts}
    candidates: list[Target] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1x1(module):
            candidates.append(Target(path, module.weight.detach().flatten(1)[None]))
        if isinstance(module, SS2D):
            candidates += [Target(f"{path}.{p}", as_stack(getattr(module, p).detach()))
                           for p in SS2D_PARAMS if p in module._parameters]  # fmt: skip
    restricted = selection.ss2d_only or selection.last_blocks is not None
    targets = []
    for target in candidates:
        if target.name in in_block and target.name not in wanted:
            continue
        if restricted and target.name not in in_block:
            continue
        if not _matches(target.name, selection.include) or _matches(target.name, selection.exclude):
            continue
        if (
            min(target.shape[1:]) < selection.min_features
            and target.name.rpartition(".")[2] != "dt_projs_weight"
        ):
            continue  # dt_proj is narrow by design (R = d_model / 16); let the savings test decide
        targets.append(target)
    return targets


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# --- calibration: input Gram matrices for activation-aware factors --------------------------
@torch.no_grad()
def input_grams(
    model: nn.Module, targets: list[Target], x: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Sum of x x^T over every input vector each target sees on `x`: (stack, cols, cols), float64."""
    grams: dict[str, torch.Tensor] = {}

    def add(name: str, inputs: torch.Tensor) -> None:  # inputs (stack, cols, samples)
        g = inputs.double() @ inputs.double().transpose(1, 2)
        grams[name] = grams[name] + g if name in grams else g

    with contextlib.ExitStack() as stack:
        for target in targets:
            stack.enter_context(_recording(model, target.name, add))
        model.eval()
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    return grams


@contextlib.contextmanager
def _recording(model: nn.Module, name: str, add) -> Iterator[None]:  # noqa: ANN001
    parent_path, _, attr = name.rpartition(".")
    if attr in SS2D_PARAMS:
        block = model.get_submodule(parent_path)
        method = {"x_proj_weight": "project_x", "dt_projs_weight": "project_dt"}.get(attr)
        if method is None:  # A_logs sees no activations
            yield
            return
        original = getattr(block, method)

        def recorded(inputs: torch.Tensor) -> torch.Tensor:  # (B, K, cols, L) -> (K, cols, B*L)
            add(name, inputs.transpose(0, 1).transpose(1, 2).flatten(2))
            return original(inputs)

        setattr(block, method, recorded)  # instance attribute shadows the method while recording
        try:
            yield
        finally:
            delattr(block, method)
        return
    module = model.get_submodule(name)
    conv = isinstance(module, nn.Conv2d)

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inp = args[0]
        if conv:  # the pixels a strided, padded 1x1 conv actually reads
            if any(module.padding):
                inp = nn.functional.pad(inp, _pad(module))
            inp = inp[..., :: module.stride[0], :: module.stride[1]].transpose(0, 1).flatten(1)
        else:
            inp = inp.reshape(-1, inp.shape[-1]).T
        add(name, inp[None])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    ph, pw = conv.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


@torch.no_grad()
def state_energies(
    model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Per `<block>.state`: each state mode's share of the scan output, sum over (C_n h_n)^2 on `x`, (N,)."""
    from edgeopt.lowrank.losses import capture_ss2d

    blocks = {n.rpartition(".")[0]: n for n in names}
    energies: dict[str, torch.Tensor] = {}
    cs: dict[str, torch.Tensor] = {}
    model.eval()
    for path in blocks:  # record each block's C (B, K, N, L) from its x projection
        block = model.get_submodule(path)

        def recorded(xs: torch.Tensor, _path: str = path, _block: SS2D = block) -> torch.Tensor:
            out = type(_block).project_x(_block, xs)
            cs[_path] = out[:, :, _block.dt_rank + _block.d_state :]
            return out

        block.project_x = recorded  # type: ignore[method-assign]
    try:
        for i in range(0, len(x), batch_size):
            with capture_ss2d(model, states=True) as cap:
                model(x[i : i + batch_size])
            for path, name in blocks.items():
                c = cs[path]  # (B, K, N, L); states (B, K*d, L, N)
                h = cap.states[path].reshape(c.shape[0], c.shape[1], -1, c.shape[3], c.shape[2])
                e = (h * c.transpose(2, 3).unsqueeze(2)).double().pow(2).sum((0, 1, 2, 3))
                energies[name] = energies[name] + e if name in energies else e
    finally:
        for path in blocks:
            del model.get_submodule(path).project_x
    return energies


def state_ranks(names: list[str], model: nn.Module, ratio: float | None, energy: float | None,
                energies: dict[str, torch.Tensor]) -> dict[str, int]:  # fmt: skip
    """Modes kept per block: ceil(ratio N), or the fewest modes holding `energy` of the output energy."""
    ranks = {}
    for name in names:
        n = model.get_submodule(name.rpartition(".")[0]).d_state
        if energy is not None:
            keep = rank_for_energy(energies[name].sort(descending=True).values.sqrt(), energy)
        else:
            keep = max(1, math.ceil(Fraction(str(ratio)) * n))  # exact: 0.14 * 50 is 7, not 7.000000000000001
        if keep < n:
            ranks[name] = keep
    return ranks


# --- rank selection ---------------------------------------------------------------------------
def ranks_by_ratio(targets: list[Target], ratio: float) -> dict[str, int]:
    ranks = {t.name: rank_for_ratio(t.shape[1], t.shape[2], ratio) for t in targets}
    return {t.name: ranks[t.name] for t in targets if t.saves(ranks[t.name])}


def ranks_by_energy(targets: list[Target], energy: float, grams: dict[str, torch.Tensor]) -> dict[str, int]:
    ranks = {}
    for t in targets:
        rank = max(rank_for_energy(s, energy) for s in _spectra(t, grams))
        if t.saves(rank):
            ranks[t.name] = rank
    return ranks


def ranks_by_budget(targets: list[Target], ratio: float, grams: dict[str, torch.Tensor]) -> dict[str, int]:
    """Spread a parameter budget (ratio of the targets' parameters) by sensitivity.

    A target's sensitivity at rank r is its relative truncation error: the dropped share of its
    squared singular values, which with calibration Grams is the relative output error on real
    activations. Greedy: every target starts at rank 1; the step with the largest error drop per
    parameter is taken until the budget is spent. A target that reaches its break-even rank can
    take one last step back to full rank (then it is left unfactorized).
    """
    budget = ratio * sum(t.params for t in targets)
    errors, ranks, caps = {}, {}, {}
    for t in targets:
        power = torch.stack([_pad_to(s**2, min(t.shape[1:])) for s in _spectra(t, grams)]).sum(0)
        errors[t.name] = (power.sum() - torch.cumsum(power, 0)) / power.sum().clamp(
            min=1e-30
        )  # err[r-1] at rank r
        ranks[t.name] = 1
        caps[t.name] = max((r for r in range(1, min(t.shape[1:]) + 1) if t.saves(r)), default=0)
    by_name = {t.name: t for t in targets}
    live = [t for t in targets if caps[t.name] >= 1]
    spent = sum(t.factor_params(1) for t in live) + sum(t.params for t in targets if caps[t.name] < 1)
    heap = [_step(by_name[n], ranks[n], caps[n], errors[n]) for n in (t.name for t in live)]
    heap = [s for s in heap if s is not None]
    heapq.heapify(heap)
    full: set[str] = set()
    while heap:
        _, cost, name = heapq.heappop(heap)
        if spent + cost > budget:
            continue
        spent += cost
        if ranks[name] == caps[name]:
            full.add(name)
            continue
        ranks[name] += 1
        step = _step(by_name[name], ranks[name], caps[name], errors[name])
        if step is not None:
            heapq.heappush(heap, step)
    return {t.name: ranks[t.name] for t in live if t.name not in full}


def _step(t: Target, rank: int, cap: int, err: torch.Tensor) -> tuple[float, int, str] | None:
    if rank < cap:
        gain, cost = float(err[rank - 1] - err[rank]), t.factor_params(rank + 1) - t.factor_params(rank)
    else:
        gain, cost = float(err[rank - 1]), t.params - t.factor_params(rank)
    return (-gain / cost, cost, t.name)


def _pad_to(values: torch.Tensor, length: int) -> torch.Tensor:
    return nn.functional.pad(values, (0, length - len(values)))


def _spectra(t: Target, grams: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    gram = grams.get(t.name)
    return [spectrum(w, None if gram is None else gram[i]) for i, w in enumerate(t.weight)]


# --- applying a plan --------------------------------------------------------------------------
def factorize(model: nn.Module, ranks: dict[str, int], grams: dict[str, torch.Tensor] | None = None,
              init: bool = True, state_modes: dict[str, list[int]] | None = None) -> None:  # fmt: skip
    """Replace every planned target in place; factors from the current weights when `init`.

    `grams` holds calibration statistics: input Grams for activation-aware factors and, for a
    `<block>.state` target, the mode energies that pick which state modes stay. `state_modes`
    names the kept modes outright (as the `lowrank` edit records them), so nothing is recomputed.
    """
    grams, state_modes = grams or {}, state_modes or {}
    for name, rank in sorted(
        ranks.items(), key=lambda item: not item[0].endswith(f".{STATE}")
    ):  # state first
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if attr == STATE:
            energy = grams.get(name) if init else None
            modes = rank if energy is None else energy.topk(rank).indices
            if name in state_modes:
                modes = torch.tensor(state_modes[name], dtype=torch.long)
                if len(modes) != rank:
                    raise ValueError(f"lowrank: {name} records {len(modes)} kept modes for rank {rank}")
            LowRankSS2D.adopt(parent).truncate_state(modes)
            continue
        if attr in SS2D_PARAMS and isinstance(parent, SS2D):
            weight = as_stack(getattr(parent, attr).detach())
            factors = _stacked_factors(weight, rank, grams.get(name)) if init else None
            LowRankSS2D.adopt(parent).factorize(attr, rank, factors)
            continue
        layer = getattr(parent, attr)
        if isinstance(layer, nn.Linear):
            new: nn.Module = FactorizedLinear(
                layer.in_features, layer.out_features, rank, layer.bias is not None
            )
        elif is_conv1x1(layer):
            new = FactorizedConv1x1(layer, rank)
        else:
            raise ValueError(f"lowrank: {name} is neither nn.Linear, a 1x1 conv nor an SS2D parameter")
        if init:
            gram = grams.get(name)
            left, right = svd_factors(layer.weight.flatten(1), rank, None if gram is None else gram[0])
            with torch.no_grad():
                new.second.weight.copy_(left.reshape(new.second.weight.shape))
                new.first.weight.copy_(right.reshape(new.first.weight.shape))
                if layer.bias is not None:
                    new.second.bias.copy_(layer.bias)
        setattr(parent, attr, new)


def _stacked_factors(
    weight: torch.Tensor, rank: int, gram: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [svd_factors(w, rank, None if gram is None else gram[i]) for i, w in enumerate(weight)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def factor_pairs(model: nn.Module, ranks: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each factorized target's (U, V) as (stack, m, r), (stack, r, n): the parameters L_SVD compares."""
    pairs = {}
    for name in ranks:
        if name.endswith(f".{STATE}"):
            continue
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path)
        if attr in SS2D_PARAMS:
            u, v = parent.factors(attr)
            pairs[name] = as_stack(u), as_stack(v)
        else:
            u, v = getattr(parent, attr).factors()
            pairs[name] = u[None], v[None]
    return pairs


def apply_plan(model: nn.Module, ranks: dict[str, int], calib_x: torch.Tensor, whiten: bool,
               state_modes: dict[str, list[int]] | None = None) -> nn.Module:  # fmt: skip
    """Truncate states (to `state_modes`, else the modes picked on `calib_x`), then factorize
    (whitened on `calib_x` if asked)."""
    states = {k: v for k, v in ranks.items() if k.endswith(f".{STATE}")}
    if states and state_modes is not None and set(states) <= set(state_modes):
        factorize(model, states, state_modes=state_modes)
    elif states:
        factorize(model, states, state_energies(model, list(states), calib_x))
    rest = {k: v for k, v in ranks.items() if k not in states}
    grams = {}
    if whiten:
        targets = [t for t in find_targets(model, Selection(min_features=1)) if t.name in rest]
        grams = input_grams(model, targets, calib_x)
    factorize(model, rest, grams)
    return model


def teacher_factors(teacher: nn.Module, ranks: dict[str, int], calib_x: torch.Tensor, whiten: bool,
                    state_modes: dict[str, list[int]] | None = None,
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], nn.Module]:  # fmt: skip
    """The teacher's rank-r factors (U sqrt(S), sqrt(S) V^T) per target, made exactly as the pass makes
    them (with the state modes the pass recorded, when given), and the freshly factorized teacher
    copy they come from (its `kept_modes` map states)."""
    made = apply_plan(copy.deepcopy(teacher), ranks, calib_x, whiten, state_modes)
    return {k: tuple(t.detach().clone() for t in v) for k, v in factor_pairs(made, ranks).items()}, made
