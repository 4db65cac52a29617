"""VMamba at 224x224 (random weights): every deployable next to eager PyTorch with the fused scan.

    python benchmarks/bench_vmamba_export.py [--models vanilla_vmamba_tiny vmamba_tiny_s1l8] [--threads 1]
                                             [--runs 5] [--no-tflite] [--no-scan]

Per model, one row per deployable: onnxruntime (standard-op ONNX, chunked scan), LiteRT (TFLite),
ExecuTorch + XNNPACK (standard-op .pte, chunked scan), ExecuTorch + custom scan (.pte with one
`edgeopt::selective_scan` node per SS2D, C++ kernel), each timed by the profiler agent in its own
process (p50 of `--runs`, batch 1), with export time, file size, node count (ONNX nodes, TFLite
operators, .pte instructions incl. delegate calls), peak RSS and parity (max |error| / output scale,
top-1) against eager. Eager (fused scan) runs in its own process too, for its peak RSS.
Then the isolated VMamba-T stage-1 scan (K*D = 768, L = 3136, N = 16 and 1): fused kernel vs the
ONNX graph in onnxruntime vs the custom op in ExecuTorch.

Eager timings on this host are dominated by page faults unless glibc keeps freed memory, so the
script re-runs itself with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ set
(DESIGN.md) and says so; the runtimes use their own arenas. It also sets NUMBA_NUM_THREADS to
--threads: on a busy 2-core host numba's idle pool threads cost the fused-kernel eager model ~27x
in median latency (digits-vmamba, 1 torch thread: 626 ms vs 23.5 ms with NUMBA_NUM_THREADS=1). Goals (issue 15): fastest deployable of
VMamba-T <= 1.3x eager fused, peak RSS <= 1.5x eager's, parity <= 1e-4; isolated scan <= 2x fused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import best_ms  # benchmarks/timing.py (the script's directory is on sys.path)

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4000000000",
          "MALLOC_TOP_PAD_": "268435456"}


def build(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from edgeopt.models import build_model

    torch.manual_seed(0)
    model = build_model(name).eval()
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    return model, torch.randn(1, channels, size, size)


def eager_child(name: str, size: int, threads: int, runs: int) -> None:
    """Eager fused-scan latency and this process's peak RSS (VmHWM), as JSON on stdout."""
    torch.set_num_threads(threads)
    model, x = build(name, size)
    with torch.no_grad():
        ms = best_ms(lambda: model(x), runs)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"ms": ms, "peak_rss_mb": int(hwm.split()[1]) / 1024}))


def nodes(path: Path) -> int:
    if path.suffix == ".onnx":
        import onnx

        return len(onnx.load(str(path)).graph.node)
    if path.suffix == ".tflite":
        from ai_edge_litert.tools import flatbuffer_utils

        return sum(len(g.operators) for g in flatbuffer_utils.read_model(str(path)).subgraphs)
    from edgeopt.exporters.pte import op_names

    return len(op_names(path))


def parity(got: np.ndarray, want: np.ndarray) -> str:
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    return f"{err:.1e} {'same' if (got.argmax(1) == want.argmax(1)).all() else 'DIFF'}"


def deployables(args: argparse.Namespace):
    """(label, runtime, exporter) per deployable."""
    from edgeopt.exporters import export
    from edgeopt.exporters.pte import export_pte

    rows = [  # most telling first: on a busy host a long run still reports these
        ("ExecuTorch+scan op", "executorch",
         lambda m, x, p: export_pte(m, x, p.with_name(p.name + "-op.pte"), scan_op=True)),
        ("onnxruntime", "onnxruntime", lambda m, x, p: export("onnx", m, x, p.with_suffix(".onnx"))),
        ("ExecuTorch+XNNPACK", "executorch",
         lambda m, x, p: export_pte(m, x, p.with_name(p.name + "-xnn.pte"), scan_op=False)),
    ]
    if not args.no_tflite:
        rows.append(("LiteRT", "tflite", lambda m, x, p: export("tflite", m, x, p.with_suffix(".tflite"))))
    return rows


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> None:
    from edgeopt.evaluate import run_onnx, run_pte, run_tflite
    from edgeopt.profiler.bundle import make_bundle
    from edgeopt.profiler.runners import profile_bundle

    child = subprocess.run([sys.executable, __file__, "--eager-child", name, str(args.size), str(args.threads),
                            str(args.runs)], capture_output=True, text=True, check=True)
    eager = json.loads(child.stdout.strip().splitlines()[-1])
    model, x = build(name, args.size)
    with torch.no_grad():
        want = model(x).numpy()
    print(f"\n{name} {args.size}x{args.size}, batch 1, {args.threads} thread(s); eager fused {eager['ms']:.0f} ms "
          f"(best of {args.runs}), peak RSS {eager['peak_rss_mb']:.0f} MiB")
    print(f"{'deployable':<20} {'export s':>8} {'MiB':>6} {'nodes':>6} {'p50 ms':>8} {'/eager':>7} "
          f"{'RSS MiB':>8} {'/eager':>7} {'max err/scale, top-1':>21}")
    run = {"onnxruntime": run_onnx, "tflite": run_tflite, "executorch": run_pte}
    for label, runtime, exporter in deployables(args):
        start = time.perf_counter()
        path = exporter(model, x, tmp / name)
        export_s = time.perf_counter() - start
        bundle = make_bundle(path, runtime, x.numpy(), want.argmax(1), tmp / f"{path.name}.bundle", args.threads)
        result = profile_bundle(bundle, runs=args.runs, min_seconds=0, warmup=1)
        p50, rss = result["latency_ms"]["p50"], result["peak_rss_mb"]
        print(f"{label:<20} {export_s:>8.0f} {path.stat().st_size / 2**20:>6.1f} {nodes(path):>6} {p50:>8.0f} "
              f"{p50 / eager['ms']:>6.2f}x {rss:>8.0f} {rss / eager['peak_rss_mb']:>6.2f}x "
              f"{parity(run[runtime](path, x.numpy(), args.threads), want):>21}", flush=True)


class _Scan(torch.nn.Module):
    def forward(self, u, delta, B, C):
        from edgeopt.ops import selective_scan

        return selective_scan(u, delta, self.A, B, C, self.D, delta_bias=self.bias, delta_softplus=True)


def bench_scan(args: argparse.Namespace, tmp: Path) -> None:
    """Isolated stage-1 scan: fused (eager) vs ONNX chunked in ORT vs the custom op in ExecuTorch."""
    from executorch.extension.pybindings import portable_lib

    from edgeopt.ops.scan_op import load_library

    load_library()
    portable_lib._unsafe_reset_threadpool(args.threads)
    print(f"\nisolated stage-1 scan, B=1 K*D=768 L=3136 G=4, {args.threads} thread(s), best of {args.runs}")
    print(f"{'N':>3} {'fused ms':>9} {'ORT ms':>8} {'ORT/fused':>10} {'ET op ms':>9} {'ET/fused':>9} "
          f"{'ORT err':>8} {'ET err':>8}")
    for nstate in (16, 1):
        print(scan_row(nstate, args, tmp), flush=True)


def scan_row(nstate: int, args: argparse.Namespace, tmp: Path) -> str:
    import onnxruntime as ort
    from executorch.extension.pybindings import portable_lib

    from edgeopt.exporters.pte import export_pte
    from edgeopt.ops import selective_scan

    g = torch.Generator().manual_seed(0)
    scan = _Scan()
    scan.A = -torch.exp(torch.randn(768, nstate, generator=g))
    scan.D, scan.bias = torch.randn(768, generator=g), torch.randn(768, generator=g) - 3
    x = (torch.randn(1, 768, 3136, generator=g), torch.randn(1, 768, 3136, generator=g) * 0.5,
         torch.randn(1, 4, nstate, 3136, generator=g), torch.randn(1, 4, nstate, 3136, generator=g))
    with torch.no_grad():
        fused = best_ms(lambda: scan(*x), args.runs)
        want = selective_scan(x[0], x[1], scan.A, x[2], x[3], scan.D, delta_bias=scan.bias,
                              delta_softplus=True, backend="reference")
        path = tmp / f"scan{nstate}.onnx"
        torch.onnx.export(scan, x, str(path), dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {a.name: t.numpy() for a, t in zip(session.get_inputs(), x, strict=True)}
    ort_ms = best_ms(lambda: session.run(None, feed), args.runs)
    ort_out = torch.from_numpy(session.run(None, feed)[0])
    packed = torch.cat([x[0], x[1], x[2].reshape(1, -1, 3136), x[3].reshape(1, -1, 3136)], dim=1)
    pte = export_pte(_Packed(scan, nstate), packed, tmp / f"scan{nstate}.pte", scan_op=True)
    program = portable_lib._load_for_executorch(str(pte))
    et_ms = best_ms(lambda: program.forward((packed,)), args.runs)
    et_out = program.forward((packed,))[0]
    scale = want.abs().max()
    return (f"{nstate:>3} {fused:>9.1f} {ort_ms:>8.1f} {ort_ms / fused:>9.2f}x {et_ms:>9.1f} {et_ms / fused:>8.2f}x "
            f"{float((ort_out - want).abs().max() / scale):>8.1e} {float((et_out - want).abs().max() / scale):>8.1e}")


class _Packed(torch.nn.Module):
    """The scan with its four inputs packed into one (1, rows, L) tensor (the .pte exporter takes one input)."""

    def __init__(self, scan: torch.nn.Module, nstate: int) -> None:
        super().__init__()
        self.scan, self.nstate = scan, nstate

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        n, length = self.nstate, packed.shape[-1]
        u, delta = packed[:, :768], packed[:, 768:1536]
        B = packed[:, 1536 : 1536 + 4 * n].reshape(1, 4, n, length)
        C = packed[:, 1536 + 4 * n :].reshape(1, 4, n, length)
        return self.scan(u, delta, B, C)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--eager-child":
        name, size, threads, runs = sys.argv[2], *map(int, sys.argv[3:6])
        return eager_child(name, size, threads, runs)
    threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    control = {**MALLOC, "NUMBA_NUM_THREADS": threads}
    if any(os.environ.get(k) != v for k, v in control.items()):  # control malloc and numba's pool for eager
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **control})
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["vanilla_vmamba_tiny", "vmamba_tiny_s1l8"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-tflite", action="store_true")
    parser.add_argument("--no-scan", action="store_true", help="skip the isolated scan")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("eager timed with glibc malloc and numba's pool controlled: "
          + " ".join(f"{k}={os.environ[k]}" for k in (*MALLOC, "NUMBA_NUM_THREADS")))
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_scan:
            bench_scan(args, Path(tmp))
        for name in args.models:
            bench_model(name, args, Path(tmp))


if __name__ == "__main__":
    main()
