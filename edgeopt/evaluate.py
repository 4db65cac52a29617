"""Accuracy, size and parity of artifacts, in-process (the profiler measures speed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeopt.artifact import TORCH, ModelArtifact
from edgeopt.errors import InputError


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def size_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6


@torch.no_grad()
def torch_outputs(module: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    module = module.eval()
    x = torch.as_tensor(x)
    return torch.cat([module(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def run_onnx(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def run_tflite(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Runs sample by sample: TFLite models are exported with a static batch of 1."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeopt.console import third_party_quiet

    with third_party_quiet():  # "INFO: Created TensorFlow Lite XNNPACK delegate", from C++
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    results = []
    for sample in np.asarray(x, dtype=np.float32):
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def run_pte(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Runs sample by sample (static batch 1) in ExecuTorch's Python runtime, with edgeopt's op
    library loaded when the program calls its custom ops (a one-line error if it is not built)."""
    from executorch.extension.pybindings import portable_lib

    from edgeopt.ops import build_kernels
    from edgeopt.profiler.bundle import pte_op_libraries

    if pte_op_libraries(path):
        from edgeopt.ops.scan_op import load_library

        try:
            load_library()
        except build_kernels.BuildError as exc:
            raise InputError(str(exc)) from None
    portable_lib._unsafe_reset_threadpool(threads)
    program = portable_lib._load_for_executorch(str(path))
    samples = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return np.stack([program.forward((s[None],))[0][0].numpy() for s in samples])


def artifact_outputs(artifact: ModelArtifact, x: np.ndarray, threads: int = 1) -> np.ndarray:
    if artifact.format == TORCH:
        return torch_outputs(artifact.load_module(), x)
    if artifact.format == "onnx":
        return run_onnx(artifact.path, x, threads)
    if artifact.format == "tflite":
        return run_tflite(artifact.path, x, threads)
    if artifact.format == "pte":
        return run_pte(artifact.path, x, threads)
    raise InputError(f"cannot run a {artifact.format} artifact on this host")


def top1_accuracy(logits: np.ndarray, labels: np.ndarray | torch.Tensor) -> float:
    return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())


def parity(reference: np.ndarray, candidate: np.ndarray, decide: Callable[[np.ndarray], np.ndarray] | None = None
           ) -> dict[str, float]:
    """Max abs error (absolute and relative to the output scale), cosine, and how often the two agree
    on the task's decisions (`decide`, default the arg-max class: top-1 agreement)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise InputError(f"parity: output shapes differ: {ref.shape} vs {cand.shape}")
    max_abs = float(np.abs(ref - cand).max())
    scale = float(np.abs(ref).max()) or 1.0
    a, b = ref.ravel(), cand.ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    decide = decide or (lambda out: np.asarray(out).argmax(-1))
    agree = float((decide(ref) == decide(cand)).mean())
    return {"max_abs": max_abs, "max_rel": max_abs / scale, "cosine": cosine, "top1_agreement": agree}
