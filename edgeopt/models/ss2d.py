"""VMamba's SS2D block: a selective scan run over an image in four directions.

Parameter names and shapes are VMamba's, so public checkpoints load unchanged:
`in_proj`, depthwise `conv2d`, `x_proj_weight` (K, R+2N, d_inner), `dt_projs_weight`
(K, d_inner, R), `dt_projs_bias` (K, d_inner), `A_logs` (K*d_inner, N), `Ds` (K*d_inner),
`out_norm`, `out_proj`, with K = 4 scan directions.

Low-rank hook: the forward pass reads the SSM parameters only through `x_proj_weights()`,
`dt_proj_weights()` and `A()` (and applies them in `project_x` / `project_dt`). A low-rank
variant subclasses SS2D (or swaps the module), replaces the three parameters with factor pairs
and overrides those methods; everything else (scan, cross-merge, norms) is reused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeopt.ops.selective_scan import active_backend, selective_scan

K_DIRECTIONS = 4
FORWARD_TYPES = ("v0", "v05_noz")


class SS2D(nn.Module):
    """2D selective scan on channel-last input (B, H, W, d_model) -> (B, H, W, d_model).

    forward_type "v0": z branch (in_proj gives x and z; out = norm(y) * silu(z));
    "v05_noz": no z branch (in_proj gives x only). d_state / ssm_ratio / conv_bias are set by
    the caller (VMamba uses 16 / 2.0 / True for v0 and 1 / 1.0 / False for vmamba_tiny_s1l8).
    """

    def __init__(
        self,
        d_model: int = 96,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        bias: bool = False,
        forward_type: str = "v0",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if forward_type not in FORWARD_TYPES:
            raise ValueError(f"SS2D forward_type must be one of {FORWARD_TYPES}, got {forward_type!r}")
        d_inner = int(ssm_ratio * d_model)
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        self.use_z = not forward_type.endswith("noz")
        self.scan_backend = scan_backend
        K = K_DIRECTIONS

        self.in_proj = nn.Linear(d_model, d_inner * (2 if self.use_z else 1), bias=bias)
        self.act = nn.SiLU()
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
            if d_conv > 1
            else None
        )
        bound = d_inner**-0.5  # nn.Linear's default init, as VMamba's stacked Linear layers
        self.x_proj_weight = nn.Parameter(torch.empty(K, rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        # dt: weights keep variance; bias puts softplus(bias) log-uniformly in [dt_min, dt_max].
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, rank).uniform_(-(rank**-0.5), rank**-0.5))
        dt = torch.exp(torch.rand(K, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # S4D-real init: A[:, n] = -(n + 1).
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    # --- the low-rank hook: override these to factorize the SSM parameters -------------------
    def x_proj_weights(self) -> torch.Tensor:
        """(K, R + 2N, d_inner): per-direction projection of x to dt, B, C."""
        return self.x_proj_weight

    def dt_proj_weights(self) -> torch.Tensor:
        """(K, d_inner, R): per-direction low-rank dt expansion."""
        return self.dt_projs_weight

    def A(self) -> torch.Tensor:
        """(K * d_inner, N) state matrix (diagonal per channel), always negative."""
        return -torch.exp(self.A_logs.float())

    def project_x(self, xs: torch.Tensor) -> torch.Tensor:
        """(B, K, d_inner, L) -> (B, K, R + 2N, L); also one sample's (K, d_inner, L)."""
        return per_direction_matmul(self.x_proj_weights(), xs)  # MatMul exports faster than Einsum

    def project_dt(self, dts: torch.Tensor) -> torch.Tensor:
        """(B, K, R, L) -> (B, K, d_inner, L); also one sample's (K, R, L)."""
        return per_direction_matmul(self.dt_proj_weights(), dts)

    # ------------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, return_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `return_states`, also the scan's hidden states (B, K*d_inner, H*W, N), scan order."""
        x = self.in_proj(x)
        z = None
        if self.use_z:
            x, z = x.chunk(2, dim=-1)
            z = self.act(z)
        x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = self.act(x)
        y, states = self.scan2d(x, return_states)
        y = self.out_norm(y)
        if z is not None:
            y = y * z
        out = self.out_proj(y)
        return (out, states) if return_states else out

    def scan2d(self, x: torch.Tensor, return_states: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, d_inner, H, W) -> merged scan output (B, H, W, d_inner) and optional states."""
        batch, dim, H, W = x.shape
        L, N, R = H * W, self.d_state, self.dt_rank
        if active_backend(self.scan_backend) == "op" and not return_states:
            return self.scan2d_op(x), None
        xs = cross_scan(x)  # (B, K, d, L)
        dts, Bs, Cs = torch.split(self.project_x(xs), [R, N, N], dim=2)
        dts = self.project_dt(dts)
        result = selective_scan(
            xs.reshape(batch, -1, L),
            dts.reshape(batch, -1, L),
            self.A(),
            Bs,
            Cs,
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            return_states=return_states,
            backend=self.scan_backend,
        )
        ys, states = result if return_states else (result, None)
        y = cross_merge(ys.reshape(batch, K_DIRECTIONS, dim, L), H, W)
        return y.to(x.dtype).permute(0, 2, 1).reshape(batch, H, W, dim), states


    def scan2d_op(self, x: torch.Tensor) -> torch.Tensor:
        """`scan2d` as the exported graph for the scan op: the reversed directions scan their
        unflipped sequences backwards inside the op (`reverse_half`), since every projection is
        per token; so the graph holds no flips (ExecuTorch's portable flip costs an index division
        per element), and at batch 1 the per-direction projections are plain batched matmuls
        (no broadcast copies of the sequences)."""
        from edgeopt.ops.scan_op import scan_node

        batch, dim, H, W = x.shape
        L, N, R = H * W, self.d_state, self.dt_rank
        rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
        xs = torch.stack([rows, cols, rows, cols], dim=1)  # (B, K, d, L), directions 2 and 3 run backwards
        per_sample = xs[0] if batch == 1 else xs
        dts, Bs, Cs = torch.split(self.project_x(per_sample), [R, N, N], dim=-2)
        dts = self.project_dt(dts)
        if batch == 1:
            dts, Bs, Cs = dts[None], Bs[None], Cs[None]
        ys = scan_node(xs.reshape(batch, -1, L), dts.reshape(batch, -1, L), self.A(), Bs, Cs, self.Ds.float(), None,
                       self.dt_projs_bias.reshape(-1).float(), True, reverse_half=True)
        ys = ys.reshape(batch, K_DIRECTIONS, dim, L)
        rows, cols = ys[:, 0] + ys[:, 2], ys[:, 1] + ys[:, 3]
        y = rows + cols.reshape(batch, dim, W, H).transpose(2, 3).reshape(batch, dim, L)
        return y.to(x.dtype).permute(0, 2, 1).reshape(batch, H, W, dim)


def per_direction_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(K, m, k) @ (B, K, k, L), or @ (K, k, L) for one sample: a plain bmm then, because torch.export
    writes matmul as expand + bmm and ExecuTorch runs those expands as element-by-element copies."""
    return torch.bmm(weight, x) if x.dim() == 3 else torch.matmul(weight, x)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, 4, C, H*W) scan outputs -> (B, C, H*W): undo each direction's order and sum."""
    batch, _, dim, _ = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    return rows + cols.reshape(batch, dim, W, H).transpose(2, 3).reshape(batch, dim, H * W)
