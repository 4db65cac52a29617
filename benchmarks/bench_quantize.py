"""Quantized exports side by side with their fp32 export, in the same runtime and thread count.

    python benchmarks/bench_quantize.py [--model digits-vmamba --checkpoint targets/checkpoints/digits-vmamba.safetensors --size 32]

`--model small-cnn` (or a missing checkpoint) takes a small conv net trained here on 8x8 digits
(seconds), a model whose time is in its weight ops. Prints, per format/precision: file size and
ratio vs that format's fp32 file, the same ratio for the stored constants alone (weights, scales,
shape constants; the rest of the file is graph structure, which quantization cannot shrink), eval
top-1 and drop vs PyTorch fp32, cosine vs PyTorch, batch-1 latency (median of --runs after warm-up)
and speed ratio vs the fp32 file — all measured in one run on this machine. For ONNX it also prints
the weight ops' share of the fp32 model's kernel time (onnxruntime's profiler), which bounds what
int8 kernels can gain: 1 / (1 - share) if they took no time at all.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import median_ms
from torch import nn

from edgeopt.data import load_dataset
from edgeopt.evaluate import parity, run_onnx, run_tflite, torch_outputs
from edgeopt.exporters.onnx import export_onnx
from edgeopt.exporters.tflite import export_tflite
from edgeopt.lowrank.measure import runner
from edgeopt.models import build_model
from edgeopt.passes.quantize import make_deployable, quantize_file
from edgeopt.quantize import quantizable_layers
from edgeopt.quantize.sensitivity import accuracy, select_float_layers

VARIANTS = {"onnx": ["fp32", "static", "dynamic", "fp16"], "tflite": ["fp32", "static", "dynamic"]}
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")  # with a constant operand: what int8 kernels can speed up in onnxruntime


def small_cnn(splits, epochs: int = 6) -> nn.Module:
    """Fallback subject: conv features + a weight-dominated MLP head, trained on the train split."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        for x, y in splits.train.batches(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def latency_ms(path: Path, sample: np.ndarray, threads: int, runs: int) -> float:
    """Median batch-1 latency of one invoke, after warm-up, in the runtime the file's suffix names."""
    return median_ms(runner(path, sample, threads), runs, warmup=max(10, runs // 10))


def deployable_bytes(path: Path) -> tuple[int, int]:
    """(file bytes, stored-constant bytes) of the file as shipped (`make_deployable`, on a copy)."""
    with tempfile.TemporaryDirectory() as work:
        shipped = make_deployable(Path(shutil.copy(path, Path(work) / path.name)))
        total = shipped.stat().st_size
        if shipped.suffix == ".onnx":
            import onnx
            from onnx import numpy_helper

            graph = onnx.load(str(shipped)).graph
            tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute)]
            return total, sum(numpy_helper.to_array(t).nbytes for t in tensors)
        from ai_edge_litert.tools import flatbuffer_utils

        model = flatbuffer_utils.read_model(str(shipped))
        return total, sum(len(b.data) for b in model.buffers if b.data is not None)


def weight_op_share(path: Path, sample: np.ndarray, threads: int, runs: int) -> float:
    """Share of onnxruntime's kernel time spent in weight ops — MatMul/Gemm/Conv (or the fused
    forms ORT rewrites them into) with a constant operand — from its profiler, on its optimized graph."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = threads, True
        options.profile_file_prefix = str(Path(work) / "profile")
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        options.log_severity_level = 3  # its note that the saved graph is host-specific: we only read it here
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, {session.get_inputs()[0].name: sample})
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = onnx.load(options.optimized_model_filepath).graph
    constants = {t.name for t in graph.initializer}
    weight_nodes = {
        n.name for n in graph.node if any(k in n.op_type for k in WEIGHT_OPS) and constants.intersection(n.input)
    }
    by_node = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    return sum(by_node[n] for n in weight_nodes) / max(1, sum(by_node.values()))


def mixed_precision(fmt, model, fp32, calib, x, y, float_top1, budget, work: Path) -> Path:
    """int8 static with the most sensitive layers kept in float until the top-1 budget holds."""
    run = run_onnx if fmt == "onnx" else run_tflite
    trial = iter(range(10**6))

    def build(only, keep):
        return quantize_file(fmt, "static", fp32, calib, work / f"mixed{next(trial)}.{fmt}", True, keep, only)

    reference = torch_outputs(model, calib)
    result = select_float_layers(quantizable_layers(model), build, run, calib, reference, x, y, float_top1, budget)
    ranked = sorted(result.sensitivity.items(), key=lambda kv: -kv[1])[:3]
    why = ("most sensitive (output NSR, one layer int8): " + ", ".join(f"{k} {v:.2e}" for k, v in ranked)
           if ranked else "all-int8 holds the budget, no sensitivity run")
    print(f"  {fmt} mixed (budget {budget} pt): kept in float {result.keep_float or 'none'}; {why}")
    return result.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-vmamba", help="a registered model, or small-cnn")
    parser.add_argument("--checkpoint", type=Path, default=Path("targets/checkpoints/digits-vmamba.safetensors"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--formats", nargs="+", default=["onnx", "tflite"], choices=list(VARIANTS))
    parser.add_argument("--mixed-budget", type=float, default=1.0, help="top-1 points for the int8 mixed row; <0: skip")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    if args.model != "small-cnn" and args.checkpoint.is_file():
        splits = load_dataset("digits", size=args.size)
        model, name = build_model(args.model, checkpoint=args.checkpoint), f"{args.model} ({args.checkpoint})"
    else:
        splits = load_dataset("digits", size=8)
        absent = "" if args.model == "small-cnn" else f" ({args.checkpoint} absent)"
        model, name = small_cnn(splits), f"small CNN on 8x8 digits{absent}"
    x, y = splits.eval.x.numpy(), splits.eval.y.numpy()
    calib = splits.calib.x[: args.calibration_samples].numpy()
    reference = torch_outputs(model, x)
    float_top1 = accuracy(reference, y)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {name}, {params / 1e3:.1f} k params; eval {len(y)} samples; PyTorch fp32 top-1 {float_top1:.2f}")
    print(f"latency: batch 1, {args.threads} thread(s), median of {args.runs} after warm-up, same runtime per block")
    header = (
        f"{'format/precision':<21}{'size MB':>9}{'size x':>8}{'consts x':>9}{'graph KB':>9}"
        f"{'top-1':>8}{'drop':>7}{'cosine':>9}{'ms':>9}{'speed x':>9}"
    )
    print(header)
    print("-" * len(header))
    sample = x[:1]
    with tempfile.TemporaryDirectory() as work:
        for fmt in args.formats:
            run = run_onnx if fmt == "onnx" else run_tflite
            example, fp32_path = torch.as_tensor(x[:2]), Path(work) / f"fp32.{fmt}"
            # the exporters' node → module records (metadata, names) stay for keep_float and mixed
            # precision; sizes are of the files as shipped, without them
            fp32 = (export_onnx if fmt == "onnx" else export_tflite)(model, example, fp32_path, keep_metadata=True)
            base_ms = base_bytes = base_consts = None
            variants = VARIANTS[fmt] + (["mixed"] if args.mixed_budget >= 0 else [])
            for mode in variants:
                if mode == "mixed":
                    path = mixed_precision(fmt, model, fp32, calib, x, y, float_top1, args.mixed_budget, Path(work))
                elif mode == "fp32":
                    path = fp32
                else:
                    path = quantize_file(fmt, mode, fp32, calib, Path(work) / f"{mode}.{fmt}")
                out = run(path, x)
                top1, (size, consts) = accuracy(out, y), deployable_bytes(path)
                ms = latency_ms(path, sample, args.threads, args.runs)
                base_ms, base_bytes, base_consts = base_ms or ms, base_bytes or size, base_consts or consts
                label = f"{fmt} {'int8 ' + mode if mode in ('static', 'dynamic', 'mixed') else mode}"
                print(
                    f"{label:<21}{size / 1e6:>9.3f}{base_bytes / size:>8.2f}{base_consts / consts:>9.2f}"
                    f"{(size - consts) / 1e3:>9.1f}{top1:>8.2f}{float_top1 - top1:>7.2f}"
                    f"{parity(reference, out)['cosine']:>9.5f}{ms:>9.4f}{base_ms / ms:>9.2f}"
                )
            if fmt == "onnx":
                share = weight_op_share(fp32, sample, args.threads, args.runs)
                print(
                    f"  onnx fp32: weight ops ({'/'.join(WEIGHT_OPS)} with a constant operand) are {100 * share:.1f}% of kernel "
                    f"time, so int8 kernels can make it at most {1 / (1 - share):.2f}x faster"
                )


if __name__ == "__main__":
    main()
