"""VMamba-T (vanilla_vmamba_tiny, random weights) at 224x224: export, graph size, ORT/TFLite vs eager.

    python benchmarks/bench_vmamba_export.py [--model vanilla_vmamba_tiny] [--threads 1] [--no-tflite]

Prints ONNX export time and node count, latency of onnxruntime vs PyTorch eager (goal: ORT no
slower), and parity (max |error| relative to the output scale, top-1) for ONNX and TFLite.
Eager is timed twice: with its default scan (the fused CPU kernel) and with the chunked scan,
the formulation the exported graph holds, so the export itself is compared like for like.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from timing import best_ms  # benchmarks/timing.py (the script's directory is on sys.path)

from edgeopt.models import build_model


def set_scan_backend(model: torch.nn.Module, backend: str | None) -> None:
    for module in model.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = backend


def parity(got: np.ndarray, want: np.ndarray) -> str:
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    return f"max|err|/scale {err:.1e}, top-1 {'same' if (got.argmax(1) == want.argmax(1)).all() else 'DIFFERENT'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vanilla_vmamba_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tflite", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model)
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        want = model(x).numpy()
        eager_ms = best_ms(lambda: model(x), args.repeats)
        set_scan_backend(model, "chunked")
        chunked_ms = best_ms(lambda: model(x), args.repeats)
        set_scan_backend(model, None)
    print(f"{args.model} {args.size}x{args.size}, batch 1, {args.threads} thread(s), best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
        export_s = time.perf_counter() - start
        nodes = len(onnx.load(str(path)).graph.node)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        ort_ms = best_ms(lambda: session.run(None, feed), args.repeats)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())  # graph + external weights
        print(f"ONNX export {export_s:.0f}s, {nodes} nodes, {size / 2**20:.0f} MiB")
        print(f"latency: eager (fused scan) {eager_ms:.0f} ms | eager (chunked scan) {chunked_ms:.0f} ms | "
              f"onnxruntime {ort_ms:.0f} ms | eager-fused/ORT {eager_ms / ort_ms:.2f}x | "
              f"eager-chunked/ORT {chunked_ms / ort_ms:.2f}x")
        print(f"ONNX parity: {parity(session.run(None, feed)[0], want)}")
        if not args.no_tflite:
            import litert_torch
            from ai_edge_litert.interpreter import Interpreter

            tfl = Path(tmp) / "model.tflite"
            start = time.perf_counter()
            litert_torch.convert(model, (x,)).export(str(tfl))
            tfl_s = time.perf_counter() - start
            interpreter = Interpreter(model_path=str(tfl), num_threads=args.threads)
            interpreter.allocate_tensors()
            inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]

            def invoke() -> None:
                interpreter.set_tensor(inp, x.numpy())
                interpreter.invoke()

            tfl_ms = best_ms(invoke, args.repeats)
            print(f"TFLite export {tfl_s:.0f}s, latency {tfl_ms:.0f} ms, parity: {parity(interpreter.get_tensor(out), want)}")


if __name__ == "__main__":
    main()
