"""Device-side profiling agent: times one model bundle and prints one JSON object.

It is copied to the device inside a bundle (model file, eval.npz, meta.json) and
runs there with nothing but Python >= 3.9, numpy and the runtime: it must never
import edgeopt or torch. Runtimes are imported lazily, so a device needs only the
one its bundle uses.

    python agent.py BUNDLE_DIR [--runs N --min-seconds S --warmup W --threads T]
    python agent.py --facts        # device facts and installed runtimes only

Timing follows TFLite's benchmark_model: warm-up runs, then timed runs until at
least N runs *and* S seconds are done (capped by --max-seconds). Accuracy is top-1
of the model's output over the whole eval set, batched as meta.json says.
Failures print {"error": ..., "kind": ...} and exit 3, so the caller can tell a
missing runtime from a crash. Hand-written because no library profiles a bundle
this way on a bare device.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata

SCHEMA = "edgeopt.profile/1"
AGENT_ERROR_EXIT = 3
RUNTIME_PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "ai-edge-litert",
    "tflite-runtime",
    "tensorrt",
    "cuda-python",
)


class AgentError(Exception):
    """An expected failure, reported as JSON with a machine-readable kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------- device facts


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip("\x00\n ")
    except OSError:
        return None


def _cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _meminfo_mb(field: str, path: str = "/proc/meminfo") -> float | None:
    """A "Field:  N kB" line of /proc/meminfo or /proc/self/status, in MB."""
    for line in (_read(path) or "").splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _temperatures_c() -> dict[str, float]:
    temps = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        raw, kind = _read(zone + "/temp"), _read(zone + "/type")
        if raw and raw.lstrip("-").isdigit():
            temps[kind or os.path.basename(zone)] = int(raw) / 1000.0
    return temps


def _jetson_power_mode() -> str | None:
    """`nvpmodel -q` on a Jetson (e.g. "NV Power Mode: 15W"); None elsewhere."""
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def runtime_versions() -> dict[str, str]:
    versions = {}
    for name in RUNTIME_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def device_facts() -> dict:
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    return {
        "hostname": platform.node(),
        "arch": platform.machine(),
        "os": platform.platform(),
        "board": _read("/proc/device-tree/model"),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cpu_max_mhz": int(max_khz) // 1000 if max_khz and max_khz.isdigit() else None,
        "governor": governor,
        "temperature_c": _temperatures_c(),
        "jetson_power_mode": _jetson_power_mode(),
        "mem_total_mb": _meminfo_mb("MemTotal"),
        "mem_available_mb": _meminfo_mb("MemAvailable"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "runtimes": runtime_versions(),
    }


def _rss_mb() -> float | None:
    return _meminfo_mb("VmRSS", "/proc/self/status")


def _peak_rss_mb() -> float:
    """VmHWM: unlike ru_maxrss, it resets at exec, so a big parent (torch) does not leak in."""
    hwm = _meminfo_mb("VmHWM", "/proc/self/status")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _os_threads() -> int | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return None


# ---------------------------------------------------------------- runtimes


def _missing(runtime: str, package: str, exc: Exception) -> AgentError:
    return AgentError(
        "missing_runtime",
        f"runtime '{runtime}' is not installed for {sys.executable} ({package}: {exc}); "
        f"run devices/setup-*.sh on the device",
    )


class OnnxRuntimeModel:
    def __init__(self, path: str, threads: int, meta: dict) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise _missing("onnxruntime", "pip install onnxruntime", exc) from None
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = meta.get("providers") or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        inputs = self.session.get_inputs()
        self.input = _pick(inputs, meta.get("input_name"), "input", lambda i: i.name)
        self.output = _pick(self.session.get_outputs(), meta.get("output_name"), "output", lambda o: o.name)
        dtypes = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
        self.dtype = dtypes.get(self.input.type, "float32")

    def run(self, batch):
        out = self.session.run([self.output.name], {self.input.name: batch.astype(self.dtype, copy=False)})
        return out[0]


class TFLiteModel:
    def __init__(self, path: str, threads: int, meta: dict) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter

            self.version = metadata.version("ai-edge-litert")
        except ImportError as first:
            try:
                from tflite_runtime.interpreter import Interpreter

                self.version = metadata.version("tflite-runtime")
            except ImportError:
                raise _missing("tflite", "pip install ai-edge-litert", first) from None
        self.providers = ["XNNPACK/CPU"]
        self.interp = Interpreter(model_path=path, num_threads=threads)
        self.input = _pick(self.interp.get_input_details(), meta.get("input_name"), "input", lambda d: d["name"])
        self.output = _pick(self.interp.get_output_details(), meta.get("output_name"), "output", lambda d: d["name"])
        batch = int(meta.get("batch_size", 1))
        fixed = int(self.input["shape"][0])
        if fixed != batch:
            try:
                shape = [batch, *(int(s) for s in self.input["shape"][1:])]
                self.interp.resize_tensor_input(self.input["index"], shape)
                self.interp.allocate_tensors()
            except (RuntimeError, ValueError) as exc:
                raise AgentError(
                    "bad_model",
                    f"the model's input batch is fixed at {fixed} and cannot be resized to batch_size "
                    f"{batch} ({str(exc).splitlines()[0]}); make the bundle with batch_size={fixed}",
                ) from None
        else:
            self.interp.allocate_tensors()
        name = self.input["name"]  # re-read: resizing changed the shape
        self.input = next(d for d in self.interp.get_input_details() if d["name"] == name)

    def run(self, batch):
        import numpy as np

        dtype = np.dtype(self.input["dtype"])
        if dtype.kind in "iu":  # int8/uint8 input: quantize with the tensor's own scale
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max)
        self.interp.set_tensor(self.input["index"], batch.astype(dtype, copy=False))
        self.interp.invoke()
        return self.interp.get_tensor(self.output["index"])


class TensorRTModel:
    """A serialized TensorRT engine via the tensorrt + cuda-python APIs (Jetson).

    Deliberately small and untested off-device: no Jetson or TensorRT exists in CI.
    """

    def __init__(self, path: str, threads: int, meta: dict) -> None:
        try:
            import tensorrt as trt
            from cuda import cudart
        except ImportError as exc:
            raise _missing("tensorrt", "JetPack python3-libnvinfer + pip install cuda-python", exc) from None
        import numpy as np

        self.np, self.cudart, self.version, self.providers = np, cudart, trt.__version__, ["TensorRT"]
        logger = trt.Logger(trt.Logger.WARNING)
        with open(path, "rb") as f:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise AgentError("bad_model", f"TensorRT could not deserialize {path} (built for another GPU/version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input = meta.get("input_name") or ins[0]
        self.output = meta.get("output_name") or outs[0]
        self.trt = trt
        self._buffers: dict = {}
        _, self.stream = cudart.cudaStreamCreate()

    def _device_buffer(self, name: str, nbytes: int) -> int:
        if self._buffers.get(name, (0, 0))[1] < nbytes:
            _, ptr = self.cudart.cudaMalloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return self._buffers[name][0]

    def run(self, batch):
        np, cudart, kind = self.np, self.cudart, self.cudart.cudaMemcpyKind
        dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.input)))
        batch = np.ascontiguousarray(batch.astype(dtype, copy=False))
        self.context.set_input_shape(self.input, batch.shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        out = np.empty(out_shape, dtype=np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.output))))
        d_in, d_out = self._device_buffer(self.input, batch.nbytes), self._device_buffer(self.output, out.nbytes)
        cudart.cudaMemcpy(d_in, batch.ctypes.data, batch.nbytes, kind.cudaMemcpyHostToDevice)
        self.context.set_tensor_address(self.input, d_in)
        self.context.set_tensor_address(self.output, d_out)
        self.context.execute_async_v3(self.stream)
        cudart.cudaStreamSynchronize(self.stream)
        cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, kind.cudaMemcpyDeviceToHost)
        return out


RUNTIMES = {"onnxruntime": OnnxRuntimeModel, "tflite": TFLiteModel, "tensorrt": TensorRTModel}


def _pick(items, name, what, key):
    if name is None:
        return items[0]
    for item in items:
        if key(item) == name:
            return item
    raise AgentError("bad_model", f"model has no {what} named '{name}' (has: {', '.join(key(i) for i in items)})")


# ---------------------------------------------------------------- profiling


def _batches(x, batch_size: int):
    """Fixed-size batches; the last one is zero-padded so fixed-shape models work."""
    import numpy as np

    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        yield batch, n


MAX_SAMPLES = 1000


def _latency_stats(times_s: list) -> dict:
    import numpy as np

    ms = np.asarray(times_s) * 1000.0
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "min": float(ms.min()),
        "max": float(ms.max()),
        "std": float(ms.std()),
        "samples": [round(float(v), 6) for v in ms[:MAX_SAMPLES]],  # for distribution plots
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _time_runs(model, sample, runs: int, min_seconds: float, max_seconds: float) -> tuple:
    """Per-run seconds until >= `runs` runs and >= `min_seconds`, or `max_seconds` passed."""
    times = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        model.run(sample)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        elapsed = t1 - started
        if (len(times) >= runs and elapsed >= min_seconds) or elapsed >= max_seconds:
            return times, elapsed


def _count_correct(model, eval_x, eval_y, batch_size: int) -> int:
    import numpy as np

    correct = 0
    for i, (batch, n) in enumerate(_batches(eval_x, batch_size)):
        logits = np.asarray(model.run(batch)).reshape(batch_size, -1)[:n]
        labels = eval_y[i * batch_size : i * batch_size + n]
        correct += int((logits.argmax(axis=1) == labels).sum())
    return correct


def profile(bundle: str, runs: int, min_seconds: float, max_seconds: float, warmup: int, threads: int | None) -> dict:
    baseline_rss = _rss_mb()
    meta_path = os.path.join(bundle, "meta.json")
    if not os.path.isfile(meta_path):
        raise AgentError("bad_bundle", f"{bundle} is not a bundle (no meta.json)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    runtime = meta["runtime"]
    if runtime not in RUNTIMES:
        raise AgentError("bad_bundle", f"unknown runtime '{runtime}' (known: {', '.join(RUNTIMES)})")
    threads = int(threads or meta.get("threads") or os.cpu_count() or 1)
    batch_size = int(meta.get("batch_size", 1))
    model_path = os.path.join(bundle, meta["model"])

    import numpy as np

    with np.load(os.path.join(bundle, meta.get("eval", "eval.npz"))) as data:
        eval_x, eval_y = data["x"], data["y"]

    start = time.perf_counter()
    model = RUNTIMES[runtime](model_path, threads, meta)
    init_s = time.perf_counter() - start

    sample = next(_batches(eval_x, batch_size))[0]
    for _ in range(warmup):
        model.run(sample)
    times, elapsed = _time_runs(model, sample, runs, min_seconds, max_seconds)
    correct = _count_correct(model, eval_x, eval_y, batch_size)

    return {
        "schema": SCHEMA,
        "runtime": runtime,
        "runtime_version": model.version,
        "providers": model.providers,
        "model": {"file": meta["model"], "sha256": _sha256(model_path), "size_bytes": os.path.getsize(model_path)},
        "bundle_id": meta.get("bundle_id"),
        "threads": threads,
        "os_threads": _os_threads(),
        "batch_size": batch_size,
        "warmup": warmup,
        "runs": len(times),
        "timed_seconds": elapsed,
        "init_ms": init_s * 1000.0,
        "latency_ms": _latency_stats(times),
        "baseline_rss_mb": baseline_rss,
        "peak_rss_mb": _peak_rss_mb(),
        "accuracy": {"top1": correct / len(eval_y), "correct": correct, "total": int(len(eval_y))},
        "device": device_facts(),
    }


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile an edgeopt bundle on this device; prints JSON.")
    parser.add_argument("bundle", nargs="?", help="bundle directory (model, eval.npz, meta.json)")
    parser.add_argument("--facts", action="store_true", help="print device facts only")
    parser.add_argument("--runs", type=int, default=50, help="minimum number of timed runs")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum total timed seconds")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop timing after this long")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: meta.json)")
    args = parser.parse_args(argv)
    try:
        if args.facts:
            result = device_facts()
        elif args.bundle is None:
            parser.error("BUNDLE_DIR is required unless --facts is given")
        else:
            if args.runs < 1 or args.warmup < 0 or args.min_seconds < 0:
                raise AgentError("bad_args", "--runs must be >= 1, --warmup and --min-seconds >= 0")
            result = profile(args.bundle, args.runs, args.min_seconds, args.max_seconds, args.warmup, args.threads)
    except AgentError as exc:
        print(json.dumps({"error": str(exc), "kind": exc.kind}))
        return AGENT_ERROR_EXIT
    except Exception as exc:  # one JSON line for the caller; the traceback goes to stderr
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "kind": "crash"}))
        return AGENT_ERROR_EXIT
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
