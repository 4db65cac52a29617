"""`torch.ops.edgeopt.selective_scan`: the selective scan as one graph node, for ExecuTorch.

`torch.export` keeps a `torch.library` op whole, so an exported SS2D holds one scan node instead
of the chunked formulation's hundreds; ExecuTorch then runs it with the C++ kernel
(`csrc/selective_scan.cpp`, registered as `edgeopt::selective_scan.out`). The functional op and
its out variant are both defined (ExecuTorch's `to_edge` needs the out variant); their PyTorch
implementations run `edgeopt.ops.selective_scan` (fused kernel in eager, else chunked) and the
Meta ("fake") implementations give shapes to tracers. B and C are always (B, G, N, L) here.

`load_library()` loads the built kernel library into this process (after ExecuTorch's
pybindings, which it links to), and `cpp_selective_scan` calls the kernel directly through its C
entry point: tests compare it with the reference loop without exporting a program.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from edgeopt.ops import build_kernels

_ARGS = ("Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D=None, Tensor? z=None, "
         "Tensor? delta_bias=None, bool delta_softplus=False, bool reverse_half=False")
_LIB = torch.library.Library("edgeopt", "DEF")
_LIB.define(f"selective_scan({_ARGS}) -> Tensor")
_LIB.define(f"selective_scan.out({_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def _eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_half=False) -> torch.Tensor:  # noqa: ANN001
    """`reverse_half`: the channels of the second half of B/C's groups scan backwards, i.e. the
    scan of their flipped sequences, flipped back (what the C++ kernel does without the flips)."""
    from edgeopt.ops.selective_scan import _fused_kernel as fused
    from edgeopt.ops.selective_scan import selective_scan

    if reverse_half:
        groups = B.shape[1]
        gsplit = (groups + 1) // 2
        csplit = u.shape[1] // groups * gsplit

        def flip(t, split):  # noqa: ANN001, ANN202
            return None if t is None else torch.cat([t[:, :split], t[:, split:].flip(-1)], dim=1)

        u, delta, z, B, C = flip(u, csplit), flip(delta, csplit), flip(z, csplit), flip(B, gsplit), flip(C, gsplit)
    kernel = fused()
    backend = "fused" if kernel is not None and kernel.fused_allowed(u, delta, A, B, C, D, z, delta_bias) else "chunked"
    out = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=backend).float()
    return flip(out, csplit) if reverse_half else out


@torch.library.impl(_LIB, "selective_scan", "CompositeExplicitAutograd")
def _functional(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,  # noqa: ANN001
                reverse_half=False):
    return _eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_half)


@torch.library.impl(_LIB, "selective_scan.out", "CompositeExplicitAutograd")
def _out(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse_half=False, *,  # noqa: ANN001
         out):
    return out.copy_(_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_half))


@torch.library.register_fake("edgeopt::selective_scan")
def _functional_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,  # noqa: ANN001
                     reverse_half=False):
    return torch.empty_like(u, dtype=torch.float32)


@torch.library.register_fake("edgeopt::selective_scan.out")
def _out_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse_half=False, *,  # noqa: ANN001
              out):
    return out


def scan_node(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    reverse_half: bool = False,
) -> torch.Tensor:
    """The scan as one `edgeopt::selective_scan` node: float32, contiguous, B/C grouped."""
    f = [None if t is None else t.float().contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
    if f[3].dim() == 3:
        f[3], f[4] = f[3].unsqueeze(1), f[4].unsqueeze(1)
    return torch.ops.edgeopt.selective_scan(*f, delta_softplus=delta_softplus, reverse_half=reverse_half)


@lru_cache(maxsize=1)
def load_library(directory: str | None = None) -> Path:
    """Load the kernel library (built by `python -m edgeopt.ops.build_kernels`) into this process.

    ExecuTorch's pybindings are imported first: the library links to them and registers its
    kernel in their operator registry. Raises `build_kernels.BuildError` with the fix when the
    library is missing or was built for another executorch/torch."""
    import executorch.extension.pybindings.portable_lib  # noqa: F401

    path = build_kernels.find_library(Path(directory) if directory else None)
    if path is None:
        raise build_kernels.BuildError(
            f"the {build_kernels.LIBRARY} op library is not built for this executorch/torch in "
            f"{directory or build_kernels.default_dir()}: run python -m edgeopt.ops.build_kernels (make setup does)"
        )
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return path


def cpp_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    directory: str | None = None,
    reverse_half: bool = False,
) -> torch.Tensor:
    """Run the C++ kernel on CPU tensors through its C entry point (same code ExecuTorch calls)."""
    lib = ctypes.CDLL(str(load_library(directory)))
    t = [None if x is None else x.detach().float().contiguous() for x in (u, delta, A, B, C, D, z, delta_bias)]
    if t[3].dim() == 3:
        t[3], t[4] = t[3].unsqueeze(1).contiguous(), t[4].unsqueeze(1).contiguous()
    batch, dim, length = t[0].shape
    out = torch.empty(batch, dim, length)
    ptr = [None if x is None else ctypes.c_void_p(x.data_ptr()) for x in t]
    i64 = ctypes.c_int64
    rc = lib.edgeopt_selective_scan_f32(*ptr, ctypes.c_int(int(delta_softplus)), ctypes.c_int(int(reverse_half)),
                                        ctypes.c_void_p(out.data_ptr()),
                                        i64(batch), i64(dim), i64(length), i64(t[3].shape[1]), i64(A.shape[1]))
    if rc:
        raise ValueError(f"edgeopt_selective_scan_f32 rejected shapes u {tuple(u.shape)}, B {tuple(B.shape)}")
    return out
