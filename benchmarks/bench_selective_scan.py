"""Selective scan forward at VMamba-T stage-1 shape: reference loop vs chunked (eager) vs chunked in ORT.

    python benchmarks/bench_selective_scan.py [--threads 1] [--repeats 3]

Shape: B=1, K*D = 4x192 = 768 channels, L = 56x56 = 3136 tokens, B/C grouped per direction (G=4),
N = 16 (VMamba v0) and N = 1 (vmamba_tiny_s1l8). Goal: chunked >= 10x faster than the reference
loop in the same run, and its ONNX graph compact (node count printed).
"""

from __future__ import annotations

import argparse
import tempfile
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    print(f"selective scan, B=1 K*D=768 L=3136, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'N':>3} {'reference ms':>13} {'chunked ms':>11} {'ORT ms':>8} {'ref/chunked':>12} {'ref/ORT':>8} "
          f"{'ONNX nodes':>11} {'max|ORT-ref|':>13}")  # fmt: skip
    for nstate in (16, 1):
        print(row(nstate, args.repeats, options))


def row(nstate: int, repeats: int, options: ort.SessionOptions) -> str:
    x = inputs(nstate)
    ref = best_ms(lambda: selective_scan(*x[:6], delta_bias=x[6], delta_softplus=True, backend="reference"),
                  max(1, repeats - 1))  # fmt: skip
    chunked = best_ms(lambda: selective_scan(*x[:6], delta_bias=x[6], delta_softplus=True), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.onnx"
        torch.onnx.export(Scan(), x, str(path), dynamo=True, verbose=False)
        nodes = len(onnx.load(str(path)).graph.node)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {a.name: t.numpy() for a, t in zip(session.get_inputs(), x, strict=True)}
        ort_ms = best_ms(lambda: session.run(None, feed), repeats)
        got = session.run(None, feed)[0]
    want = selective_scan(*x[:6], delta_bias=x[6], delta_softplus=True, backend="reference").numpy()
    err = abs(got - want).max() / abs(want).max()
    return (f"{nstate:>3} {ref:>13.1f} {chunked:>11.1f} {ort_ms:>8.1f} {ref / chunked:>11.1f}x {ref / ort_ms:>7.1f}x "
            f"{nodes:>11} {err:>13.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
