"""VMamba at 224x224 and the RGB-IR detector: every deployable next to eager PyTorch with the fused scan.

    python benchmarks/bench_vmamba_export.py [--models vanilla_vmamba_tiny vmamba_tiny_s1l8 rgbt-vmamba-det scan]
                                             [--columns ort litert et-xnn et-op] [--runs 5] [--threads 1]
                                             [--record results.jsonl] [--cache DIR] [--fresh]

Per model, one row per deployable (`--columns`): onnxruntime (`ort`, standard-op ONNX, chunked scan),
LiteRT (`litert`, TFLite), ExecuTorch + XNNPACK (`et-xnn`, standard-op .pte, chunked scan), ExecuTorch +
custom scan (`et-op`, .pte with one `edgeopt::selective_scan` node per SS2D, C++ kernel), each timed by the
profiler agent in its own process (p50 of `--runs`, batch 1), with export time, file size, node count
(ONNX nodes, TFLite operators, .pte instructions incl. delegate calls), peak RSS and parity (max |error| /
output scale; top-1 = same argmax over the last axis: classes, or per detector anchor) against eager.
Eager (fused scan) runs in its own process every time, for its peak RSS, so every ratio is one run's.
The detector (`rgbt-vmamba-det`) is built through the model registry at its own input size, with the
committed checkpoint when it fits the registered config (random weights otherwise, said in the header).
`scan` is the isolated VMamba-T stage-1 scan (K*D = 768, L = 3136, N = 16 and 1): fused kernel vs the
ONNX graph in onnxruntime vs the custom op in ExecuTorch (program and bare kernel).

Exports are cached under `--cache` (keyed by the weights, input shape, column and runtime versions),
so one column or model can be re-timed in a short run without re-exporting; after changing an exporter
or the scan's graph pass `--fresh`. A cached row shows its original export time marked `c`. `--record` appends one JSON line per row.

Eager timings on this host are dominated by page faults unless glibc keeps freed memory, so the
script re-runs itself with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ set
(DESIGN.md) and says so; the runtimes use their own arenas. It also sets NUMBA_NUM_THREADS to
--threads: on a busy 2-core host numba's idle pool threads cost the fused-kernel eager model ~27x
in median latency (digits-vmamba, 1 torch thread: 626 ms vs 23.5 ms with NUMBA_NUM_THREADS=1). Goals (issue 15): fastest deployable of
VMamba-T <= 1.3x eager fused, peak RSS <= 1.5x eager's, parity <= 1e-4; isolated scan <= 2x fused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "targets" / "checkpoints"
COLUMNS = {  # column -> (label, agent runtime, file suffix)
    "ort": ("onnxruntime", "onnxruntime", ".onnx"),
    "litert": ("LiteRT", "tflite", ".tflite"),
    "et-xnn": ("ExecuTorch+XNNPACK", "executorch", ".pte"),
    "et-op": ("ExecuTorch+scan op", "executorch", ".pte"),
}


def build(name: str, size: int | None) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The registered model (checkpoint when one fits, else seed-0 random weights), an input, and which."""
    from edgeopt.errors import InputError
    from edgeopt.models import build_model

    torch.manual_seed(0)
    weights = "random weights (seed 0)"
    checkpoint = CHECKPOINTS / f"{name}.safetensors"
    model = None
    if checkpoint.is_file():
        try:
            model, weights = build_model(name, checkpoint=checkpoint), f"checkpoint {checkpoint.name}"
        except InputError as exc:  # the registered config changed since the checkpoint was trained
            weights = f"random weights (seed 0; checkpoint does not fit: {str(exc)[:80]})"
    if model is None:
        torch.manual_seed(0)
        model = build_model(name)
    model = model.eval()
    size = size or getattr(model, "img_size", 224)
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    return model, torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0)), weights


def eager_child(name: str, size: int, threads: int, runs: int) -> None:
    """Eager fused-scan latency and this process's peak RSS (VmHWM), as JSON on stdout."""
    torch.set_num_threads(threads)
    model, x, _ = build(name, size or None)
    with torch.no_grad():
        ms = best_ms(lambda: model(x), runs)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"ms": ms, "peak_rss_mb": int(hwm.split()[1]) / 1024}))


def nodes(path: Path) -> int:
    if path.suffix == ".onnx":
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node)
    if path.suffix == ".tflite":
        from ai_edge_litert.tools import flatbuffer_utils

        return sum(len(g.operators) for g in flatbuffer_utils.read_model(str(path)).subgraphs)
    from edgeopt.exporters.pte import op_names

    return len(op_names(path))


def parity(got: np.ndarray, want: np.ndarray) -> tuple[float, bool]:
    """Max |error| / output scale, and whether the argmax over the last axis agrees everywhere."""
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    return err, bool((got.argmax(-1) == want.argmax(-1)).all())


def export_column(column: str, model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    from edgeopt.exporters import export
    from edgeopt.exporters.pte import export_pte

    if column == "et-op":
        return export_pte(model, x, path, scan_op=True)
    if column == "et-xnn":
        return export_pte(model, x, path, scan_op=False)
    return export({"ort": "onnx", "litert": "tflite"}[column], model, x, path)


def cache_key(model: torch.nn.Module, x: torch.Tensor, column: str) -> str:
    """Weights + input shape + column + runtime library versions (not edgeopt's sources: after
    changing an exporter or the scan's graph, pass --fresh)."""
    from importlib.metadata import version

    versions = " ".join(version(p) for p in ("torch", "executorch", "onnx", "onnxruntime", "ai-edge-litert"))
    digest = hashlib.sha256(f"{column} {tuple(x.shape)} {versions}".encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_export(column: str, model: torch.nn.Module, x: torch.Tensor, name: str, args: argparse.Namespace
                  ) -> tuple[Path, float, bool]:
    """(model file, export seconds, whether it came from the cache)."""
    folder = Path(args.cache) / f"{name}-{column}-{cache_key(model, x, column)}"
    meta = folder / "export.json"
    if meta.is_file() and not args.fresh:
        info = json.loads(meta.read_text())
        return folder / info["file"], info["export_s"], True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    path = export_column(column, model, x, folder / f"{name}{COLUMNS[column][2]}")
    export_s = time.perf_counter() - start
    meta.write_text(json.dumps({"file": path.name, "export_s": export_s}))
    return path, export_s, False


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> None:
    from edgeopt.evaluate import run_onnx, run_pte, run_tflite
    from edgeopt.profiler.bundle import make_bundle
    from edgeopt.profiler.runners import profile_bundle

    child = subprocess.run([sys.executable, __file__, "--eager-child", name, str(args.size or 0), str(args.threads),
                            str(args.runs)], capture_output=True, text=True, check=True)
    eager = json.loads(child.stdout.strip().splitlines()[-1])
    model, x, weights = build(name, args.size)
    with torch.no_grad():
        want = model(x).numpy()
    size = "x".join(map(str, x.shape[1:]))
    print(f"\n{name} {size} ({weights}), batch 1, {args.threads} thread(s); eager fused {eager['ms']:.0f} ms "
          f"(best of {args.runs}), peak RSS {eager['peak_rss_mb']:.0f} MiB", flush=True)
    print(f"{'deployable':<20} {'export s':>8} {'MiB':>6} {'nodes':>6} {'p50 ms':>8} {'/eager':>7} "
          f"{'RSS MiB':>8} {'/eager':>7} {'max err/scale, top-1':>21}", flush=True)
    run = {"onnxruntime": run_onnx, "tflite": run_tflite, "executorch": run_pte}
    for column in args.columns:
        label, runtime, _ = COLUMNS[column]
        path, export_s, cached = cached_export(column, model, x, name, args)
        bundle = make_bundle(path, runtime, x.numpy(), np.zeros(1, dtype=np.int64), tmp / f"{name}-{column}.bundle",
                             args.threads, labelled=False)
        result = profile_bundle(bundle, runs=args.runs, min_seconds=0, warmup=1)
        p50, rss = result["latency_ms"]["p50"], result["peak_rss_mb"]
        err, same = parity(run[runtime](path, x.numpy(), args.threads), want)
        row = {"model": name, "input": size, "weights": weights, "column": column, "deployable": label,
               "export_s": export_s, "export_cached": cached, "mib": path.stat().st_size / 2**20,
               "nodes": nodes(path), "p50_ms": p50, "eager_ms": eager["ms"], "peak_rss_mb": rss,
               "eager_peak_rss_mb": eager["peak_rss_mb"], "max_err_scale": err, "same_top1": same,
               "threads": args.threads, "runs": args.runs, "load": os.getloadavg()[0]}
        print(f"{label:<20} {export_s:>7.0f}{'c' if cached else ' '} {row['mib']:>6.1f} {row['nodes']:>6} "
              f"{p50:>8.0f} {p50 / eager['ms']:>6.2f}x {rss:>8.0f} {rss / eager['peak_rss_mb']:>6.2f}x "
              f"{err:>12.1e} {'same' if same else 'DIFF':>8}", flush=True)
        record(args, row)


def record(args: argparse.Namespace, row: dict) -> None:
    if args.record:
        with open(args.record, "a") as f:
            f.write(json.dumps(row) + "\n")


class _Scan(torch.nn.Module):
    def forward(self, u, delta, B, C):
        from edgeopt.ops import selective_scan

        return selective_scan(u, delta, self.A, B, C, self.D, delta_bias=self.bias, delta_softplus=True)


def bench_scan(args: argparse.Namespace, tmp: Path) -> None:
    """Isolated stage-1 scan: fused (eager) vs ONNX chunked in ORT vs the custom op in ExecuTorch
    (a four-input program holding the one scan node, and the bare C++ kernel through ctypes)."""
    from executorch.extension.pybindings import portable_lib

    from edgeopt.ops.scan_op import load_library

    load_library()
    portable_lib._unsafe_reset_threadpool(args.threads)
    print(f"\nisolated stage-1 scan, B=1 K*D=768 L=3136 G=4, {args.threads} thread(s), best of {args.runs}")
    print(f"{'N':>3} {'fused ms':>9} {'ORT ms':>8} {'ORT/fused':>10} {'ET op ms':>9} {'ET/fused':>9} "
          f"{'kernel ms':>10} {'kern/fused':>11} {'ORT err':>8} {'ET err':>8}")
    for nstate in (16, 1):
        print(scan_row(nstate, args, tmp), flush=True)


def scan_row(nstate: int, args: argparse.Namespace, tmp: Path) -> str:
    import onnxruntime as ort
    from executorch.extension.pybindings import portable_lib

    from edgeopt.exporters.pte import export_pte
    from edgeopt.ops import selective_scan
    from edgeopt.ops.scan_op import cpp_selective_scan

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
    pte = export_pte(scan, x, tmp / f"scan{nstate}.pte", scan_op=True)
    program = portable_lib._load_for_executorch(str(pte))
    et_ms = best_ms(lambda: program.forward(x), args.runs)
    et_out = program.forward(x)[0]
    kernel = lambda: cpp_selective_scan(*x[:2], scan.A, *x[2:], scan.D, delta_bias=scan.bias,  # noqa: E731
                                        delta_softplus=True)
    kernel_ms = best_ms(kernel, args.runs)
    scale = want.abs().max()
    row = {"model": "stage1-scan", "nstate": nstate, "fused_ms": fused, "ort_ms": ort_ms, "et_ms": et_ms,
           "kernel_ms": kernel_ms, "ort_err": float((ort_out - want).abs().max() / scale),
           "et_err": float((et_out - want).abs().max() / scale), "threads": args.threads, "runs": args.runs,
           "load": os.getloadavg()[0]}
    record(args, row)
    return (f"{nstate:>3} {fused:>9.1f} {ort_ms:>8.1f} {ort_ms / fused:>9.2f}x {et_ms:>9.1f} {et_ms / fused:>8.2f}x "
            f"{kernel_ms:>10.1f} {kernel_ms / fused:>10.2f}x {row['ort_err']:>8.1e} {row['et_err']:>8.1e}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--eager-child":
        name, size, threads, runs = sys.argv[2], *map(int, sys.argv[3:6])
        return eager_child(name, size, threads, runs)
    threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    control = {**MALLOC, "NUMBA_NUM_THREADS": threads}
    if any(os.environ.get(k) != v for k, v in control.items()):  # control malloc and numba's pool for eager
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **control})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vanilla_vmamba_tiny", "vmamba_tiny_s1l8", "rgbt-vmamba-det",
                                                        "scan"],
                        help="registered model names, and 'scan' for the isolated stage-1 scan")
    parser.add_argument("--columns", nargs="+", choices=list(COLUMNS), default=list(COLUMNS),
                        help="deployables to time (default: all)")
    parser.add_argument("--size", type=int, default=None, help="input size [default: the model's own, else 224]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "edgeopt" / "bench_vmamba_export"),
                        help="where exports are kept between runs")
    parser.add_argument("--fresh", action="store_true", help="re-export even when a cached export exists")
    parser.add_argument("--record", help="append one JSON line per row to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("eager timed with glibc malloc and numba's pool controlled: "
          + " ".join(f"{k}={os.environ[k]}" for k in (*MALLOC, "NUMBA_NUM_THREADS"))
          + f"; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "scan":
                bench_scan(args, Path(tmp))
            else:
                bench_model(name, args, Path(tmp))


if __name__ == "__main__":
    main()
