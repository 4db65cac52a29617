"""What a factorization buys: parameters (all / inside SS2D), MACs, and latency in a deployed runtime.

Latency of several models is measured side by side in one process: rounds alternate between the
models (order reversed every round), so load on a shared machine hits all of them alike and the
ratios between them stay meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeopt.models.ss2d import SS2D


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ss2d_params(model: nn.Module) -> int:
    return sum(params(m) for m in model.modules() if isinstance(m, SS2D))


@torch.no_grad()
def macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward on `example` (matmuls, convolutions, einsums)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(example)
    return counter.get_total_flops() // 2


SCAN_FLOPS_PER_UPDATE = 5  # exp(delta*A) mul, delta*B*u (2 muls), h*dA + dBu (2), read-out add folded in


@torch.no_grad()
def scan_flops(model: nn.Module, example: torch.Tensor) -> int:
    """The selective scans' elementwise work in one forward: ~5 flops per (d, l, n) state update,
    summed over every SS2D block (K directions x d_inner channels x L tokens x N states).

    `torch.utils.flop_counter` counts matrix products only, so this work — linear in the state size
    N, the thing Low-Rank SS2D's state truncation cuts — never shows in MACs; report it beside them."""
    total = 0

    def hook(module: SS2D, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal total
        batch, H, W = args[0].shape[0], args[0].shape[1], args[0].shape[2]
        states = module.A().shape  # (K * d_inner, N), N after any state truncation
        total += SCAN_FLOPS_PER_UPDATE * batch * states[0] * states[1] * H * W

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, SS2D)]
    try:
        model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return total


TIMING_SUFFIX = {"onnx": ".onnx", "tflite": ".tflite"}


def export_for_timing(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The model in the runtime its suffix names (.onnx: ONNX Runtime, .tflite: LiteRT), with the
    example's static shape: latency is measured at one batch size, so the graph need not carry a
    dynamic batch dimension (nor the shape guards that come with one)."""
    from edgeopt.exporters import export
    from edgeopt.exporters.onnx import OPSET, quiet
    from edgeopt.fileio import write_with

    path = Path(path)
    if path.suffix == ".tflite":
        return export("tflite", model.eval(), example, path)

    def write(tmp: Path) -> None:
        with quiet():
            torch.onnx.export(model.eval(), (example,), input_names=["input"], output_names=["output"],
                              opset_version=OPSET, dynamo=True, external_data=False).save(str(tmp))  # fmt: skip

    return write_with(path, write)


def runner(path: Path, x: np.ndarray, threads: int) -> Callable[[], object]:
    """One inference of the exported model at `path` on `x`, in the runtime its suffix names."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        from edgeopt.console import third_party_quiet

        with third_party_quiet():  # "INFO: Created TensorFlow Lite XNNPACK delegate", from C++
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]

        def invoke() -> None:
            interpreter.set_tensor(index, x)
            interpreter.invoke()

        return invoke
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def latency_ms(
    models: dict[str, Path],
    x: np.ndarray,
    threads: int = 1,
    rounds: int = 20,
    runs_per_round: int = 10,
    warmup: int = 5,
) -> dict[str, float]:
    """Median per-inference latency (ms) of each exported model (ONNX Runtime for .onnx, LiteRT for
    .tflite) on input `x`, interleaved round by round so load changes hit every model alike."""
    runners = {name: runner(Path(path), x, threads) for name, path in models.items()}
    return interleaved_ms(runners, rounds, runs_per_round, warmup)


def interleaved_ms(
    fns: dict[str, Callable[[], object]], rounds: int, runs_per_round: int, warmup: int = 1
) -> dict[str, float]:
    """Median per-call ms of each function, rounds alternating (order reversed every round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(runs_per_round):
                fns[name]()
            times[name].append((time.perf_counter() - start) / runs_per_round * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}
