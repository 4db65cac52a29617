"""Groupwise low-bit weight quantization (int4 / int2) with an HQQ-style zero-point optimizer.

Written by hand rather than taken from `hqq` because the store needs a fixed,
documented byte layout that the loader thread can decode with plain tensor ops
(packed codes + fp16 scale + fp16 zero per group), and hqq's packing and its CUDA
oriented backends are not a stable on-disk format. The optimizer follows HQQ
(Badri & Shaji, 2023): start from min-max, then alternate a generalized soft
threshold on the residual (an lp "norm" with p < 1, robust to outliers) with a
closed-form zero-point update, keeping the best iterate.

Codes are packed *planar* within each group (the first half of a group's codes in
the low bits, the next in the high bits, ...), so unpacking is a few strided
copies rather than an interleave.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def for_width(self, in_features: int) -> QuantSpec:
        """This spec with the largest group <= `group` that divides `in_features` (small models)."""
        for g in range(min(self.group, in_features), 0, -1):
            if in_features % g == 0 and g % self.per_byte == 0:
                return QuantSpec(self.bits, g)
        raise ValueError(f"no {self.bits}-bit group size fits rows of width {in_features}")

    def check(self, in_features: int) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"unsupported bit width {self.bits}")
        if in_features % self.group or self.group % self.per_byte:
            raise ValueError(f"group {self.group} does not divide {in_features} / fit {self.bits}-bit packing")


@dataclass
class QuantizedWeight:
    """codes (rows, groups, group/per_byte) uint8; scale, zero (rows, groups, 1) fp16. W ≈ (q - zero) * scale."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def codes_unpacked(self) -> torch.Tensor:
        """Integer codes (out, in) as uint8."""
        rows, groups, packed = self.codes.shape
        per_byte = 8 // self.bits
        mask = (1 << self.bits) - 1
        planes = [self.codes & mask] + [(self.codes >> (j * self.bits)) & mask for j in range(1, per_byte)]
        return torch.stack(planes, dim=2).view(rows, groups * per_byte * packed)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize())

    def dequantize(self) -> torch.Tensor:
        """fp32 (out, in). Tuned for CPU: unpack in uint8, one cast, then in-place affine in fp32."""
        rows, groups, packed = self.codes.shape
        per_byte = 8 // self.bits
        mask = (1 << self.bits) - 1
        planes = [self.codes & mask] + [(self.codes >> (j * self.bits)) & mask for j in range(1, per_byte)]
        out = torch.stack(planes, dim=2).float().view(rows, groups, per_byte * packed)
        out.sub_(self.zero.float()).mul_(self.scale.float())
        return out.view(rows, groups * per_byte * packed)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, groups, size = q.shape
    per_byte = 8 // bits
    parts = q.to(torch.uint8).view(rows, groups, per_byte, size // per_byte)
    packed = torch.zeros(rows, groups, size // per_byte, dtype=torch.uint8)
    for j in range(per_byte):
        packed |= parts[:, :, j] << (j * bits)
    return packed


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal step of the lp (p < 1) error term."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1))


def quantize(
    weight: torch.Tensor, spec: QuantSpec, optimize: bool = True, iters: int = 20, p: float = 0.7
) -> QuantizedWeight:
    """Quantize a 2-D weight (out, in) groupwise along `in`."""
    spec = spec.for_width(weight.shape[1])
    spec.check(weight.shape[1])
    w = weight.detach().float().reshape(weight.shape[0], -1, spec.group)
    qmax = (1 << spec.bits) - 1
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    inv_scale = qmax / (hi - lo).clamp_min(1e-8)  # HQQ parametrisation: q = round(w * inv_scale + zero)
    zero = -lo * inv_scale
    if optimize:
        beta, best, best_zero = 10.0, float("inf"), zero
        for _ in range(iters):
            q = torch.round(w * inv_scale + zero).clamp_(0, qmax)
            w_r = (q - zero) / inv_scale
            err = (w - w_r).abs().mean().item()
            if err < best:
                best, best_zero = err, zero
            else:
                break
            residual = _shrink(w - w_r, beta, p)
            zero = (q - (w - residual) * inv_scale).mean(-1, keepdim=True)
            beta *= 1.01
        zero = best_zero
    q = torch.round(w * inv_scale + zero).clamp_(0, qmax)
    scale = (1.0 / inv_scale).half()
    return QuantizedWeight(_pack(q, spec.bits), scale, zero.half(), spec.bits)
