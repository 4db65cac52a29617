"""The MoE expert kernels (libedgeopt_moe.so) against float64 numpy, with numpy and ctypes only, so a
board without torch runs it: `python moe_kernels_check_numpy.py path/to/libedgeopt_moe.so` prints the
relative error of each fp16 / int4 SwiGLU and bf16 linear case and "worst ... PASS" (<= 1e-5 of the
output scale), exit 1 otherwise. tests/test_emulated_rpi5.py runs it on the emulated Raspberry Pi 5
with an aarch64 build of the library (its `__fp16` code path, not the x86 intrinsics)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np

P, L = ctypes.c_void_p, ctypes.c_int64
SHAPES = [(1024, 768, 1), (96, 160, 3), (40, 24, 2), (130, 70, 1)]  # (hidden, width, tokens)


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    return P(a.ctypes.data)


def swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    t = x @ gate_up.T
    inter = down.shape[1]
    gate = t[:, :inter]
    return (gate / (1 + np.exp(-gate)) * t[:, inter:]) @ down.T


def int4_planar(w: np.ndarray) -> tuple:
    """Min-max int4 codes in the store's planar layout: (codes, scale, zero, group, dequantized float64)."""
    rows, cols = w.shape
    g = next(g for g in range(min(64, cols), 0, -1) if cols % g == 0 and g % 2 == 0)
    wg = w.astype(np.float32).reshape(rows, cols // g, g)
    lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    scale = ((hi - lo) / 15).astype(np.float16)
    scale[scale == 0] = 1
    zero = (-lo / scale.astype(np.float32)).astype(np.float16)
    q = np.clip(np.round(wg / scale.astype(np.float32) + zero.astype(np.float32)), 0, 15).astype(np.uint8)
    codes = np.ascontiguousarray(q[..., : g // 2] | (q[..., g // 2:] << 4))
    deq = ((q.astype(np.float64) - zero.astype(np.float64)) * scale.astype(np.float64)).reshape(rows, cols)
    return codes, np.ascontiguousarray(scale[..., 0]), np.ascontiguousarray(zero[..., 0]), g, deq


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def main(path: str) -> int:
    lib = ctypes.CDLL(path)
    rng = np.random.default_rng(0)
    worst = 0.0
    for hidden, inter, tokens in SHAPES:
        gu = (rng.standard_normal((2 * inter, hidden)) * 0.05).astype(np.float16)
        d = (rng.standard_normal((hidden, inter)) * 0.05).astype(np.float16)
        x = rng.standard_normal((tokens, hidden)).astype(np.float32)
        y, tmp = np.empty((tokens, hidden), np.float32), np.empty((tokens, 2 * inter), np.float32)
        lib.edgeopt_swiglu_f16(ptr(gu), ptr(d), ptr(x), ptr(y), ptr(tmp), L(tokens), L(hidden), L(inter))
        errors = {"f16": rel(y, swiglu(x.astype(np.float64), gu.astype(np.float64), d.astype(np.float64)))}
        c1, s1, z1, g1, d1 = int4_planar(gu)
        c2, s2, z2, g2, d2 = int4_planar(d)
        lib.edgeopt_swiglu_q4(ptr(c1), ptr(s1), ptr(z1), L(g1), ptr(c2), ptr(s2), ptr(z2), L(g2),
                              ptr(x), ptr(y), ptr(tmp), L(tokens), L(hidden), L(inter))
        errors["q4"] = rel(y, swiglu(x.astype(np.float64), d1, d2))
        w = (rng.standard_normal((301, hidden)) * 0.05).astype(np.float32)
        bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)
        exact = (bf16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        b, out = rng.standard_normal(301).astype(np.float32), np.empty((tokens, 301), np.float32)
        lib.edgeopt_linear_bf16(ptr(bf16), ptr(b), ptr(x), ptr(out), L(tokens), L(301), L(hidden))
        errors["bf16"] = rel(out, x.astype(np.float64) @ exact.T + b)
        for name, e in errors.items():
            print(f"{name} hidden {hidden} width {inter} tokens {tokens}: {e:.2e}")
            worst = max(worst, e)
    ok = worst <= 1e-5
    print(f"worst {worst:.2e} {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
