"""Factorized replacements: nn.Linear, 1x1 nn.Conv2d, and Low-Rank SS2D.

Every factorized forward applies its factors one after the other (x -> x V^T -> (x V^T) U^T), so a
rank-r layer costs r (m + n) multiply-adds per token instead of m n; the full matrix is never
rebuilt per call. The one exception is SS2D's state matrix A = -exp(U V): it is elementwise in the
scan and does not depend on the input, so it is formed from its factors once per forward (and
ONNX Runtime folds it into a constant, since both factors are initializers).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeopt.models.ss2d import SS2D, per_direction_matmul


class FactorizedLinear(nn.Module):
    """y = second(first(x)): a rank-r replacement for nn.Linear(in, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.out_features

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with W ~ U @ V: (out x r, r x in)."""
        return self.second.weight, self.first.weight


class FactorizedConv1x1(nn.Module):
    """A rank-r replacement for a 1x1 nn.Conv2d: two 1x1 convolutions (stride/padding on the first)."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.first = nn.Conv2d(conv.in_channels, rank, 1, stride=conv.stride, padding=conv.padding, bias=False,
                               padding_mode=conv.padding_mode)  # fmt: skip
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.out_channels

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.second.weight.flatten(1), self.first.weight.flatten(1)


def is_conv1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


# The pseudo-target `<block>.state` truncates the scan's state dimension N to the kept modes: the
# scan's cost is linear in N, so this is where a low-rank SS2D gets faster, not only smaller.
STATE = "state"

# SS2D parameters that Low-Rank SS2D can factorize, each seen as a stack of matrices:
# x_proj_weight (K, R+2N, d_inner) per direction, dt_projs_weight (K, d_inner, R) per direction,
# A_logs (K*d_inner, N) as one matrix (channels x state), so A = -exp(U V) stays negative and the
# transition stays input-dependent through delta.
SS2D_PARAMS = ("x_proj_weight", "dt_projs_weight", "A_logs")


def as_stack(weight: torch.Tensor) -> torch.Tensor:
    """A parameter as (stack, rows, cols)."""
    return weight if weight.dim() == 3 else weight.unsqueeze(0)


class LowRankSS2D(SS2D):
    """SS2D with any subset of SS2D_PARAMS stored as factor pairs `<name>_u` (.., m, r), `<name>_v` (.., r, n).

    SS2D does not record its constructor arguments, so a block becomes low-rank in place:
    `LowRankSS2D.adopt(block)` swaps its class (parameters, norms and scan settings stay), then
    `factorize` replaces one parameter at a time. Unfactorized parameters use SS2D's own code.
    """

    ranks: dict[str, int]

    @classmethod
    def adopt(cls, block: SS2D) -> LowRankSS2D:
        if not isinstance(block, cls):
            block.__class__ = cls
            block.ranks = {}
        return block

    def factorize(
        self, name: str, rank: int, factors: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Replace parameter `name` by rank-`rank` factors (given, or uninitialized for a load to fill)."""
        if name not in SS2D_PARAMS or name in self.ranks:
            raise ValueError(f"cannot factorize SS2D parameter {name!r}")
        weight = getattr(self, name)
        stack, rows, cols = as_stack(weight).shape
        if factors is None:
            factors = (weight.new_empty(stack, rows, rank), weight.new_empty(stack, rank, cols))
        u, v = (f.reshape(*weight.shape[:-2], *f.shape[-2:]).detach().clone() for f in factors)
        delattr(self, name)
        self.register_parameter(f"{name}_u", nn.Parameter(u))
        self.register_parameter(f"{name}_v", nn.Parameter(v))
        self.ranks[name] = rank

    def truncate_state(self, modes: int | torch.Tensor) -> None:
        """Keep the state modes `modes` (indices; or a count, structure only): B/C rows of x_proj and A's columns."""
        if self.ranks:
            raise ValueError("truncate the SS2D state before factorizing its parameters")
        keep = torch.arange(modes) if isinstance(modes, int) else torch.as_tensor(modes).sort().values
        R, N = self.dt_rank, self.d_state
        rows = torch.cat([torch.arange(R), R + keep, R + N + keep])
        self.x_proj_weight = nn.Parameter(self.x_proj_weight.detach()[:, rows].clone())
        self.A_logs = nn.Parameter(self.A_logs.detach()[:, keep].clone())
        self.d_state = len(keep)
        self.kept_modes = None if isinstance(modes, int) else keep  # known only when picked from data
        self.ranks[STATE] = len(keep)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_u"), getattr(self, f"{name}_v")

    def _full(self, name: str) -> torch.Tensor:
        if name not in self.ranks:
            return getattr(self, name)
        u, v = self.factors(name)
        return u @ v

    def x_proj_weights(self) -> torch.Tensor:
        return self._full("x_proj_weight")

    def dt_proj_weights(self) -> torch.Tensor:
        return self._full("dt_projs_weight")

    def A(self) -> torch.Tensor:
        if "A_logs" not in self.ranks:
            return super().A()
        return -torch.exp(self._full("A_logs").float())

    def project_x(self, xs: torch.Tensor) -> torch.Tensor:
        if "x_proj_weight" not in self.ranks:
            return super().project_x(xs)
        u, v = self.factors("x_proj_weight")  # (K, C, r), (K, r, d) @ (B, K, d, L): plain MatMuls in ONNX
        return per_direction_matmul(u, per_direction_matmul(v, xs))

    def project_dt(self, dts: torch.Tensor) -> torch.Tensor:
        if "dt_projs_weight" not in self.ranks:
            return super().project_dt(dts)
        u, v = self.factors("dt_projs_weight")  # (K, d, q), (K, q, R) @ (B, K, R, L)
        return per_direction_matmul(u, per_direction_matmul(v, dts))
