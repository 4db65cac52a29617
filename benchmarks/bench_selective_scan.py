"""Selective scan forward at VMamba-T stage-1 shape: reference loop vs chunked vs fused (eager) vs chunked in ORT.

    python benchmarks/bench_selective_scan.py [--threads 1 2] [--repeats 3]

Shape: B=1, K*D = 4x192 = 768 channels, L = 56x56 = 3136 tokens, B/C grouped per direction (G=4),
N = 16 (VMamba v0) and N = 1 (vmamba_tiny_s1l8). Goal: the default backend >= 10x faster than the
reference loop in the same run. In eager inference the default is the fused kernel; exported graphs
use the chunked formulation, timed in onnxruntime with its ONNX node count (compactness).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from timing import best_ms  # benchmarks/timing.py (the script's directory is on sys.path)
from torch import nn

from edgeopt.ops import selective_scan


class Scan(nn.Module):
    def forward(self, u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)


def inputs(nstate: int, dim: int = 768, length: int = 3136, groups: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, dim, length, generator=g),
        torch.randn(1, dim, length, generator=g) * 0.5,
        -torch.exp(torch.randn(dim, nstate, generator=g)),
        torch.randn(1, groups, nstate, length, generator=g),
        torch.randn(1, groups, nstate, length, generator=g),
        torch.randn(dim, generator=g),
        torch.randn(dim, generator=g) - 3,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export internals
    print(f"selective scan, B=1 K*D=768 L=3136, best of {args.repeats}; fused = eager default, ORT = exported default")
    print(f"{'thr':>3} {'N':>3} {'reference ms':>13} {'chunked ms':>11} {'fused ms':>9} {'ORT ms':>8} {'ref/chunked':>12} "
          f"{'ref/fused':>10} {'ref/ORT':>8} {'ONNX nodes':>11} {'fused err':>10} {'ORT err':>8}")  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        for nstate in (16, 1):
            print(row(threads, nstate, args.repeats, options), flush=True)


def row(threads: int, nstate: int, repeats: int, options: ort.SessionOptions) -> str:
    x = inputs(nstate)

    def scan(backend: str | None) -> torch.Tensor:
        return selective_scan(*x[:6], delta_bias=x[6], delta_softplus=True, backend=backend)

    ref = best_ms(lambda: scan("reference"), max(1, repeats - 1))
    chunked = best_ms(lambda: scan("chunked"), repeats)
    fused = best_ms(lambda: scan(None), repeats)  # eager, no autograd: the default is the fused kernel
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.onnx"
        torch.onnx.export(Scan().eval(), x, str(path), dynamo=True, verbose=False)
        nodes = len(onnx.load(str(path)).graph.node)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {a.name: t.numpy() for a, t in zip(session.get_inputs(), x, strict=True)}
        ort_ms = best_ms(lambda: session.run(None, feed), repeats)
        got = torch.from_numpy(session.run(None, feed)[0])
    want = scan("reference")
    scale = want.abs().max()
    fused_err, ort_err = (scan(None) - want).abs().max() / scale, (got - want).abs().max() / scale
    return (f"{threads:>3} {nstate:>3} {ref:>13.1f} {chunked:>11.1f} {fused:>9.1f} {ort_ms:>8.1f} {ref / chunked:>11.1f}x "
            f"{ref / fused:>9.1f}x {ref / ort_ms:>7.1f}x {nodes:>11} {fused_err:>10.1e} {ort_err:>8.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
