"""digits-vmamba in ExecuTorch (custom scan op): int8 (XNNPACK PT2E) next to fp32, at batch 1 and a larger batch.

    python benchmarks/bench_pte_int8.py [--batches 1 64] [--rounds 7] [--threads 1]

Per batch size, both programs are exported with the same static batch (int8 calibrated on 64 samples
of the calib split) and timed interleaved in one process (median over `--rounds` rounds of
per-call means, Python's GC off as in the profiler agent), reporting per-sample ms and the int8/fp32
ratio, file size, top-1 on the eval split, and what each program executes: XNNPACK delegate calls,
portable operators, quantize/dequantize operators outside the delegates (there should be none: the
scan op and the cross-scan copies stay float) and whether the XNNPACK payloads carry int8 weights.
"""

from __future__ import annotations

import argparse
import collections
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeopt.data import load_dataset
from edgeopt.exporters.pte import export_pte, op_names
from edgeopt.models import build_model
from edgeopt.ops.scan_op import load_library

CHECKPOINT = Path(__file__).resolve().parents[1] / "targets" / "checkpoints" / "digits-vmamba.safetensors"


def per_sample_ms(programs: dict, x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    """Interleaved rounds (order alternating), median of each round's mean, per sample."""
    times: dict[str, list[float]] = {name: [] for name in programs}
    names = list(programs)
    gc.disable()
    try:
        for name in names:
            for _ in range(3):
                programs[name].forward((x,))
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                for _ in range(calls):
                    programs[name].forward((x,))
                times[name].append((time.perf_counter() - start) / calls / len(x) * 1e3)
    finally:
        gc.enable()
    return {name: float(np.median(t)) for name, t in times.items()}


def top1(program, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    n = len(x) // batch * batch
    preds = [program.forward((torch.from_numpy(x[i : i + batch]),))[0].numpy().argmax(1) for i in range(0, n, batch)]
    return float((np.concatenate(preds) == y[:n]).mean())


def describe(path: Path) -> str:
    ops = collections.Counter(op_names(path))
    delegates = sum(v for k, v in ops.items() if k.startswith("delegate:"))
    qdq = sum(v for k, v in ops.items() if "quantize" in k)
    portable = sum(ops.values()) - delegates - qdq
    return f"{delegates} XNNPACK calls, {portable} other ops, {qdq} q/dq outside delegates"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval", type=int, default=512, help="eval samples for top-1")
    args = parser.parse_args()
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(args.threads)
    load_library()
    portable_lib._unsafe_reset_threadpool(args.threads)
    model = build_model("digits-vmamba", checkpoint=CHECKPOINT).eval()
    splits = load_dataset("digits", size=32)
    calib = torch.from_numpy(np.asarray(splits.calib.x[:64], dtype=np.float32))
    eval_x = np.ascontiguousarray(splits.eval.x[: args.eval], dtype=np.float32)
    eval_y = np.asarray(splits.eval.y[: args.eval])
    print(f"digits-vmamba (trained), ExecuTorch + scan op, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'batch':>5} {'fp32 ms/sample':>15} {'int8 ms/sample':>15} {'int8/fp32':>10} {'fp32 KB':>8} {'int8 KB':>8} "
          f"{'fp32 top-1':>10} {'int8 top-1':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            x = torch.from_numpy(eval_x[:batch].copy())
            paths = {
                "fp32": export_pte(model, x, Path(tmp) / f"fp32-b{batch}.pte", batch_size=batch),
                "int8": export_pte(model, x, Path(tmp) / f"int8-b{batch}.pte", quantize=True, calibration=[calib],
                                   batch_size=batch),
            }
            programs = {k: portable_lib._load_for_executorch(str(p)) for k, p in paths.items()}
            ms = per_sample_ms(programs, x, args.rounds, max(5, 200 // batch))
            acc = {k: top1(p, eval_x, eval_y, batch) for k, p in programs.items()}
            size = {k: p.stat().st_size / 1024 for k, p in paths.items()}
            print(f"{batch:>5} {ms['fp32']:>15.4f} {ms['int8']:>15.4f} {ms['int8'] / ms['fp32']:>9.2f}x "
                  f"{size['fp32']:>8.0f} {size['int8']:>8.0f} {acc['fp32']:>10.2%} {acc['int8']:>10.2%}", flush=True)
            for k, p in paths.items():
                print(f"      {k}: {describe(p)}")


if __name__ == "__main__":
    main()
