"""Structure-aware distillation losses (DLRMamba): L_SVD, L_state, L_feat, plus logit KL.

Each term is zero when student and teacher agree and positive otherwise. Every term is divided by
the teacher's energy (a constant: L_state and L_feat are MSEs relative to the teacher signal's mean
square, L_SVD squared Frobenius errors relative to the teacher factors') and averaged over blocks,
so blocks of any size and scale weigh the same and the default weights (1.0 / 0.5 / 0.1 / 1.5)
mean the same thing on any model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.models.ss2d import SS2D

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def svd_loss(student: Pairs, teacher: Pairs) -> torch.Tensor:
    """mean over targets of (||U_s - U_t sqrt(S)||^2 + ||V_s - sqrt(S) V_t^T||^2) / (||U_t||^2 + ||V_t||^2)."""
    terms = []
    for name, (u_t, v_t) in teacher.items():
        u_s, v_s = student[name]
        err = (u_s - u_t).pow(2).sum() + (v_s - v_t).pow(2).sum()
        terms.append(err / (u_t.pow(2).sum() + v_t.pow(2).sum()).clamp(min=1e-12))
    return torch.stack(terms).mean()


def state_loss(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], steps: torch.Tensor | None = None,
    projections: nn.ModuleDict | None = None,
) -> torch.Tensor:  # fmt: skip
    """(1/|steps|) sum_t MSE(h_s[t], P h_t[t]) averaged over SS2D blocks; states (B, D, L, N).

    `steps` samples scan positions (all when None); P maps the teacher's state size to the
    student's where they differ (a learned nn.Linear from `projections`, keyed by block).
    """
    terms = []
    for name, h_t in teacher.items():
        h_s = student[name]
        if steps is not None:
            h_s, h_t = h_s[:, :, steps], h_t[:, :, steps]
        if projections is not None and _key(name) in projections:
            h_t = projections[_key(name)](h_t)
        terms.append(_relative_mse(h_s, h_t))
    return torch.stack(terms).mean()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE of SS2D block outputs (relative to the teacher's mean square), averaged over blocks."""
    return torch.stack([_relative_mse(student[name], y_t) for name, y_t in teacher.items()]).mean()


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher) / teacher.detach().pow(2).mean().clamp(min=1e-12)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton's soft-target KL, scaled by T^2."""
    log_s = F.log_softmax(student / temperature, -1)
    log_t = F.log_softmax(teacher / temperature, -1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def state_projections(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    modes: dict[str, torch.Tensor] | None = None,
) -> nn.ModuleDict:
    """A learned map teacher -> student state size for each block where the sizes differ.

    Initialized to pick the student's kept modes (`modes[block]`) when known, so L_state starts
    by comparing each kept mode with the teacher's same mode.
    """
    projections = nn.ModuleDict()
    for name, h_t in teacher.items():
        n_t, n_s = h_t.shape[-1], student[name].shape[-1]
        if n_t == n_s:
            continue
        layer = nn.Linear(n_t, n_s, bias=False)
        if modes is not None and name in modes:
            with torch.no_grad():
                layer.weight.zero_()
                layer.weight[torch.arange(n_s), modes[name]] = 1.0
        projections[_key(name)] = layer
    return projections


def _key(name: str) -> str:
    return name.replace(".", "/")  # ModuleDict keys cannot hold dots


class Capture:
    """Outputs (and optionally scan hidden states) of every SS2D block in the last forward."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.states: dict[str, torch.Tensor] = {}


@contextlib.contextmanager
def capture_ss2d(model: nn.Module, states: bool) -> Iterator[Capture]:
    """Run SS2D blocks with `return_states` while active, recording their outputs and states.

    The block's caller (VSSBlock) does not ask for states, so each block's `forward` is shadowed
    by an instance attribute for the duration and restored afterwards.
    """
    capture = Capture()
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, SS2D)]
    for name, block in blocks:

        def forward(x: torch.Tensor, _name: str = name, _block: SS2D = block) -> torch.Tensor:
            result = type(_block).forward(_block, x, return_states=states)
            out, hidden = result if states else (result, None)
            capture.outputs[_name] = out
            if hidden is not None:
                capture.states[_name] = hidden
            return out

        block.forward = forward  # type: ignore[method-assign]
    try:
        yield capture
    finally:
        for _, block in blocks:
            del block.forward
