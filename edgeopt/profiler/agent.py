"""Device-side profiling agent: times one model bundle and prints one JSON object.

It is copied to the device inside a bundle (model file, eval.npz, meta.json) and
runs there with nothing but Python >= 3.9, numpy and the runtime: it must never
import edgeopt or torch. Runtimes are imported lazily, so a device needs only the
one its bundle uses.

    python agent.py BUNDLE_DIR [--runs N --min-seconds S --warmup W --threads T --engine-cache DIR]
    python agent.py --facts        # device facts and installed runtimes only

Timing follows TFLite's benchmark_model: warm-up runs, then timed runs until at
least N runs *and* S seconds are done (capped by --max-seconds). Accuracy is top-1
of the model's output over the whole eval set, batched as meta.json says.
A tensorrt bundle may carry an ONNX model and a precision instead of an engine:
the agent then builds the engine on this device with the tensorrt Python API and
caches it (see `cached_engine`); that GPU path is untested on hardware.
Failures print {"error": ..., "kind": ...} and exit 3, so the caller can tell a
missing runtime from a crash. Hand-written because no library profiles a bundle
this way on a bare device.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
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
    "executorch",
    "torch",
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


_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def _cpuinfo_arch() -> str | None:
    """The ISA /proc/cpuinfo describes: x86 lists vendor_id and flags, ARM its CPU implementer."""
    keys = {line.split(":")[0].strip() for line in (_read("/proc/cpuinfo") or "").splitlines()}
    if "vendor_id" in keys and "flags" in keys:
        return "x86_64"
    if "CPU implementer" in keys:
        return "aarch64"
    return None


def emulation() -> dict | None:
    """How this interpreter is emulated, or None when it runs natively.

    qemu-user answers uname() with the guest's machine (aarch64), but it passes the
    kernel's own files through: /proc/sys/kernel/arch (Linux >= 6.1), else /proc/cpuinfo,
    still name the host's ISA. A process whose machine differs from its kernel's runs
    under a binfmt_misc emulator, and its timings are the emulator's, not the device's.
    """
    machine = _ARCH_ALIASES.get(platform.machine(), platform.machine())
    kernel = _read("/proc/sys/kernel/arch") or _cpuinfo_arch()
    kernel = _ARCH_ALIASES.get(kernel, kernel) if kernel else None
    if kernel is None or kernel == machine:
        return None
    binfmt = _read(f"/proc/sys/fs/binfmt_misc/qemu-{machine}") or ""
    interpreter = next((line.split()[1] for line in binfmt.splitlines() if line.startswith("interpreter ")), None)
    return {
        "emulator": f"qemu-user ({interpreter})" if interpreter else "a binfmt_misc emulator",
        "cpu": os.environ.get("QEMU_CPU") or "the emulator's default",  # which core qemu emulates
        "guest_arch": machine,
        "host_arch": kernel,
        "host_facts": "cpu_model, cores, cpu_max_mhz, governor, temperature_c and memory are the host's",
    }


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
    emulated = emulation()
    cpu_model = _cpu_model()
    if emulated:  # never pass the host's CPU (or a stand-in /proc/cpuinfo) off as the board's
        cpu_model = f"{cpu_model} ({emulated['guest_arch']} emulated on a {emulated['host_arch']} host)"
    return {
        "hostname": platform.node(),
        "arch": platform.machine(),
        "emulated": emulated,
        "os": platform.platform(),
        "board": _read("/proc/device-tree/model"),
        "cpu_model": cpu_model,
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
        "op_libraries": op_library_facts(),
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
        f"runtime '{runtime}' is not installed for {sys.executable} ({package}: {_one_line(exc)}); "
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


# ---------------------------------------------------------------- ExecuTorch
#
# ExecuTorch's Python runtime links libtorch and takes torch tensors, so torch is imported here
# only, for .pte bundles; every other runtime stays torch-free. A bundle whose program calls
# edgeopt's custom ops (meta.json `op_libraries`) needs the kernel library built on this device
# from the bundle's ops/ sources (ops/build_kernels.py, g++) against this exact executorch.

EXECUTORCH_INSTALL = "pip install 'executorch==1.4.*' torch==2.13.0 (or devices/setup-rpi-os.sh with EDGEOPT_PTE=1)"


def op_library_dirs(bundle: str | None = None) -> list:
    """Where built op libraries are looked for, in order ($EDGEOPT_OPS_DIR, the user cache, the bundle)."""
    dirs = [os.environ.get("EDGEOPT_OPS_DIR"), os.path.join(os.path.expanduser("~"), ".cache", "edgeopt", "ops")]
    if bundle:
        dirs.append(os.path.join(bundle, "ops", "lib"))
    return [d for d in dirs if d]


def _op_library_stamp(directory: str, name: str) -> dict | None:
    lib, stamp = os.path.join(directory, f"lib{name}.so"), os.path.join(directory, f"{name}.json")
    if not (os.path.isfile(lib) and os.path.isfile(stamp)):
        return None
    try:
        with open(stamp, encoding="utf-8") as f:
            return dict(json.load(f), path=lib)
    except (OSError, ValueError):
        return None


def op_library_facts() -> dict:
    """Built op libraries on this device and whether they match its executorch/torch."""
    versions = runtime_versions()
    found = {}
    for directory in op_library_dirs():
        for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
            name = os.path.basename(path)[:-5]
            stamp = _op_library_stamp(directory, name)
            if stamp is None or name in found:
                continue
            usable = all(stamp.get(k) == versions.get(k) for k in ("executorch", "torch"))
            found[name] = {"path": stamp["path"], "executorch": stamp.get("executorch"), "torch": stamp.get("torch"),
                           "usable": usable}
    return found


def find_op_library(need: dict, bundle: str | None = None) -> str:
    """Path of a built library matching `need` (meta.json op_libraries entry) and this executorch/torch,
    or a one-line missing_op_library error naming what to build or install."""
    name, versions = need["name"], runtime_versions()
    for directory in op_library_dirs(bundle):
        stamp = _op_library_stamp(directory, name)
        if stamp and stamp.get("source_sha256") == need.get("source_sha256") and all(
            stamp.get(k) == versions.get(k) for k in ("executorch", "torch")
        ):
            return stamp["path"]
    build = os.path.join(bundle or ".", "ops", "build_kernels.py")
    raise AgentError(
        "missing_op_library",
        f"this .pte calls {', '.join(need.get('ops', []))} from op library '{name}', which is not built for "
        f"executorch {versions.get('executorch')} / torch {versions.get('torch')} here "
        f"(looked in {', '.join(op_library_dirs(bundle))}): build it with {sys.executable} {build} "
        f"(needs g++; devices/setup-rpi-os.sh with EDGEOPT_OPS_SRC does it)",
    )


class ExecuTorchModel:
    """A .pte program in ExecuTorch's Python runtime, XNNPACK delegate and custom ops included."""

    def __init__(self, path: str, threads: int, meta: dict) -> None:
        try:
            import torch
            from executorch.extension.pybindings import portable_lib
        except ImportError as exc:
            raise _missing("executorch", EXECUTORCH_INSTALL, exc) from None
        import ctypes

        self.torch = torch
        self.version = metadata.version("executorch")
        libraries = meta.get("op_libraries") or []
        for need in libraries:  # after portable_lib: the kernels register into its operator table
            ctypes.CDLL(find_op_library(need, meta.get("_bundle_dir")), mode=ctypes.RTLD_GLOBAL)
        portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's and the custom kernels' pool
        torch.set_num_threads(threads)
        self.providers = ["XNNPACK/CPU"] + [f"ops:{need['name']}" for need in libraries]
        try:
            self.module = portable_lib._load_for_executorch(path)
        except RuntimeError as exc:
            raise AgentError("bad_model", f"ExecuTorch cannot load {path}: {_one_line(exc)}") from None

    def run(self, batch):
        x = self.torch.from_numpy(batch.astype("float32", copy=False))
        return self.module.forward((x,))[0].numpy()


# ---------------------------------------------------------------- TensorRT engines
#
# One torch-free implementation of "ONNX -> engine -> run" for both ends: this
# file is copied alone to a Jetson (engines only run on the GPU model and
# TensorRT version that built them, so the device builds its own), and
# edgeopt.exporters.tensorrt imports it for `edgeopt export --format tensorrt`.
# UNTESTED ON HARDWARE: edgeopt's CI has no NVIDIA GPU; the code follows the
# TensorRT 10 Python API and cuda-python 12. Off-GPU behaviour (the one-line
# errors, the cache key) is tested.

TRT_PRECISIONS = ("fp32", "fp16", "int8", "mixed")
TRT_INSTALL = (
    "on a Jetson: sudo apt install python3-libnvinfer (JetPack) and a venv made with --system-site-packages; "
    "elsewhere: pip install tensorrt"
)
CUDA_PYTHON_INSTALL = "pip install 'cuda-python>=12,<13'"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tensorrt_modules() -> tuple:
    """(tensorrt, cudart) for building and running engines, or a one-line missing_runtime error."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise AgentError(
            "missing_runtime",
            f"runtime 'tensorrt' is not installed for {sys.executable} ({_one_line(exc)}): {TRT_INSTALL}; "
            f"it also needs cuda-python ({CUDA_PYTHON_INSTALL}); devices/setup-jetpack.sh installs both",
        ) from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except (ImportError, OSError):
        try:
            from cuda import cudart  # older cuda-python 12.x
        except (ImportError, OSError) as exc:
            raise AgentError(
                "missing_runtime",
                f"'cuda-python' (GPU buffers for the tensorrt runtime) is not installed for {sys.executable} "
                f"({_one_line(exc)}): {CUDA_PYTHON_INSTALL}, or run devices/setup-jetpack.sh",
            ) from None
    return trt, cudart


def _cuda(cudart, result, what: str):
    """cuda-python calls return (error, *values): raise on an error, else return the value(s)."""
    err, values = result[0], tuple(result[1:])
    if err != cudart.cudaError_t.cudaSuccess:
        raise AgentError("cuda_error", f"{what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values


def gpu_name(cudart) -> str:
    """Name and compute capability of GPU 0, or a one-line error when CUDA sees no GPU."""
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # a missing driver library can raise instead of returning an error code
        err, count = _one_line(exc), 0
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        raise AgentError(
            "missing_runtime",
            f"no CUDA GPU is visible to {sys.executable} (cudaGetDeviceCount: {getattr(err, 'name', err)}, "
            f"{count} devices): the tensorrt runtime needs an NVIDIA GPU with its driver (JetPack on a Jetson)",
        )
    prop = _cuda(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{name.strip(chr(0)).strip()} sm_{prop.major}{prop.minor}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "x"


def engine_cache_key(onnx_sha256: str, precision: str, trt_version: str, gpu: str, batch: tuple) -> str:
    """File name of a cached engine. An engine is only valid for the GPU model and TensorRT
    version that built it, and differs by ONNX file, precision and batch profile: all are keyed."""
    parts = [onnx_sha256, precision, trt_version, gpu, [int(b) for b in batch]]
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return f"{precision}-trt{_slug(trt_version)}-{_slug(gpu)}-{digest}.engine"


def build_engine(
    onnx_path: str,
    precision: str,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 32,
    workspace_mb: int = 1024,
) -> bytes:
    """Serialized TensorRT engine for an ONNX file whose batch dimension may be dynamic.

    fp16: FP16 kernels allowed (TensorRT keeps fp32 where faster or needed).
    int8: explicit quantization, i.e. the ONNX carries symmetric int8 Q/DQ nodes (the
    quantize pass, static mode), plus FP16 for the float rest; mixed: the same Q/DQ
    but without FP16, so the layers kept float for accuracy stay fp32. UNTESTED ON HARDWARE.
    """
    if precision not in TRT_PRECISIONS:
        raise AgentError("bad_bundle", f"unknown TensorRT precision '{precision}' (known: {', '.join(TRT_PRECISIONS)})")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise AgentError("bad_args", f"batch profile must satisfy 1 <= min <= opt <= max, got "
                                     f"{min_batch}, {opt_batch}, {max_batch}")
    trt, cudart = tensorrt_modules()
    gpu_name(cudart)  # a clear error before TensorRT's own on a GPU-less machine
    with open(onnx_path, "rb") as f:
        has_qdq = b"QuantizeLinear" in f.read()
    if precision in ("int8", "mixed") and not has_qdq:
        raise AgentError("bad_model", f"{onnx_path}: {precision} TensorRT engines need a Q/DQ ONNX model "
                                      f"(quantize pass: format onnx, mode static)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # implied in TensorRT 10
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):  # from a path: finds external weight files
        errors = "; ".join(_one_line(parser.get_error(i), 200) for i in range(parser.num_errors))
        raise AgentError("bad_model", f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision in ("int8", "mixed"):
        config.set_flag(trt.BuilderFlag.INT8)
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if -1 in shape[1:]:
            raise AgentError("bad_model", f"input '{tensor.name}' has dynamic dimensions {shape} beyond the "
                                          f"batch; export the model with a fixed input shape")
        if shape and shape[0] == -1:
            rest = shape[1:]
            profile.set_shape(tensor.name, (min_batch,) + rest, (opt_batch,) + rest, (max_batch,) + rest)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AgentError("build_failed", f"TensorRT could not build a {precision} engine from {onnx_path}; "
                                         f"its log is on stderr")
    return bytes(serialized)


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".engine.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_engine(onnx_path: str, precision: str, batch_size: int, cache_dir: str) -> tuple:
    """(engine path, facts): the engine from `cache_dir`, built and stored there on a miss.

    The build is timed apart from the runtime's init, since a cache hit skips it.
    An unwritable cache still profiles (engine in a temporary directory), with a warning.
    """
    trt, cudart = tensorrt_modules()
    gpu = gpu_name(cudart)
    batch = (1, batch_size, batch_size)  # the agent only runs batches of batch_size
    key = engine_cache_key(_sha256(onnx_path), precision, trt.__version__, gpu, batch)
    path = os.path.join(cache_dir, key)
    facts = {"precision": precision, "gpu": gpu, "tensorrt": trt.__version__, "batch_profile": list(batch),
             "cache_file": path, "cached": os.path.isfile(path), "build_ms": 0.0}
    if facts["cached"]:
        return path, dict(facts, size_bytes=os.path.getsize(path))
    start = time.perf_counter()
    data = build_engine(onnx_path, precision, *batch)
    facts["build_ms"] = (time.perf_counter() - start) * 1000.0
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _write_atomic(path, data)
    except OSError as exc:
        scratch = tempfile.mkdtemp(prefix="edgeopt-engine-")
        atexit.register(shutil.rmtree, scratch, True)  # this run only: nothing left behind
        path = os.path.join(scratch, key)
        _write_atomic(path, data)
        facts["cache_file"] = None
        print(f"warning: engine cache {cache_dir} is not writable ({_one_line(exc)}); engine not cached",
              file=sys.stderr)
    return path, dict(facts, size_bytes=len(data))


class TensorRTModel:
    """A serialized TensorRT engine, fed through cuda-python device buffers (no torch, no pycuda).

    UNTESTED ON HARDWARE: edgeopt's CI has no NVIDIA GPU; written against the
    TensorRT 10 and cuda-python 12 APIs (name-based tensor I/O, execute_async_v3).
    """

    def __init__(self, path: str, threads: int, meta: dict) -> None:
        trt, cudart = tensorrt_modules()
        gpu_name(cudart)
        import numpy as np

        self.np, self.trt, self.cudart = np, trt, cudart
        self.version, self.providers = trt.__version__, ["TensorRT"]
        with open(path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise AgentError("bad_model", f"TensorRT could not deserialize {path} (built for another GPU or "
                                          f"TensorRT version? delete it to rebuild)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input = _pick([n for n in names if mode(n) == trt.TensorIOMode.INPUT], meta.get("input_name"),
                           "input", str)
        self.output = _pick([n for n in names if mode(n) == trt.TensorIOMode.OUTPUT], meta.get("output_name"),
                            "output", str)
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        self._buffers: dict = {}
        self.stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        shape = list(self.engine.get_tensor_shape(self.input))
        shape[0] = int(meta.get("batch_size", 1)) if shape[0] == -1 else shape[0]
        self._set_shape(tuple(shape))

    def _set_shape(self, shape: tuple) -> None:
        if not self.context.set_input_shape(self.input, shape):
            raise AgentError("bad_model", f"the engine's input '{self.input}' does not accept shape {shape} "
                                          f"(engine shape {tuple(self.engine.get_tensor_shape(self.input))}); "
                                          f"make the bundle with a batch size the engine was built for")
        self.shape = shape
        self.out_shape = tuple(self.context.get_tensor_shape(self.output))

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (None, 0))
        if size < nbytes:
            if ptr is not None:
                _cuda(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
            ptr = _cuda(self.cudart, self.cudart.cudaMalloc(nbytes), "cudaMalloc")
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, batch):
        np, cudart = self.np, self.cudart
        kind = cudart.cudaMemcpyKind
        batch = np.ascontiguousarray(batch, dtype=self.in_dtype)
        if batch.shape != self.shape:
            self._set_shape(batch.shape)
        out = np.empty(self.out_shape, self.out_dtype)
        d_in = self._device_buffer(self.input, batch.nbytes)
        d_out = self._device_buffer(self.output, out.nbytes)
        self.context.set_tensor_address(self.input, int(d_in))
        self.context.set_tensor_address(self.output, int(d_out))
        _cuda(cudart, cudart.cudaMemcpyAsync(d_in, batch.ctypes.data, batch.nbytes, kind.cudaMemcpyHostToDevice,
                                             self.stream), "copying the input to the GPU")
        if not self.context.execute_async_v3(int(self.stream)):
            raise AgentError("crash", "TensorRT execute_async_v3 failed; its log is on stderr")
        _cuda(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, kind.cudaMemcpyDeviceToHost,
                                             self.stream), "copying the output from the GPU")
        _cuda(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out


RUNTIMES = {"onnxruntime": OnnxRuntimeModel, "tflite": TFLiteModel, "tensorrt": TensorRTModel,
            "executorch": ExecuTorchModel}


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
        "p10": float(np.percentile(ms, 10)),
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
    """Per-run seconds until >= `runs` runs and >= `min_seconds`, or `max_seconds` passed.

    Python's cyclic GC is off while timing (as in `timeit`): with torch imported (ExecuTorch bundles)
    its collections, triggered by the runtime's per-call objects, took 6-8% of a 1 ms program here."""
    import gc

    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            model.run(sample)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            elapsed = t1 - started
            if (len(times) >= runs and elapsed >= min_seconds) or elapsed >= max_seconds:
                return times, elapsed
    finally:
        if enabled:
            gc.enable()


def _count_correct(model, eval_x, eval_y, batch_size: int) -> int:
    import numpy as np

    correct = 0
    for i, (batch, n) in enumerate(_batches(eval_x, batch_size)):
        logits = np.asarray(model.run(batch)).reshape(batch_size, -1)[:n]
        labels = eval_y[i * batch_size : i * batch_size + n]
        correct += int((logits.argmax(axis=1) == labels).sum())
    return correct


def _detect(model, eval_x, batch_size: int, settings: dict, bundle: str) -> list:
    """Raw detector outputs -> per image [[x1, y1, x2, y2, score, label], ...] with the bundle's
    own `yolo_decode.py` (numpy), so every runtime's outputs are decoded the same way."""
    import numpy as np

    sys.path.insert(0, os.path.abspath(bundle))
    try:
        import yolo_decode
    except ImportError as exc:
        raise AgentError("bad_bundle", f"detector bundle without its decoder: {exc}") from None
    finally:
        sys.path.pop(0)
    detections = []
    for batch, n in _batches(eval_x, batch_size):
        raw = np.asarray(model.run(batch))
        raw = raw.reshape(batch_size, -1, raw.shape[-1])[:n]
        for boxes, scores, labels in yolo_decode.postprocess(
            raw, settings["img_size"], settings["strides"], settings["conf_threshold"],
            settings["iou_threshold"], settings["max_det"]):
            rows = np.concatenate([boxes, scores[:, None], labels[:, None].astype(np.float32)], axis=1)
            detections.append(np.round(rows.astype(np.float64), 3).tolist())
    return detections


def profile(bundle: str, runs: int, min_seconds: float, max_seconds: float, warmup: int, threads: int | None,
            engine_cache: str | None = None) -> dict:
    """Profile a bundle. A tensorrt bundle with an ONNX model first gets its engine from
    `engine_cache` (default: `engine-cache/` next to the bundle), building it on a miss."""
    baseline_rss = _rss_mb()
    meta_path = os.path.join(bundle, "meta.json")
    if not os.path.isfile(meta_path):
        raise AgentError("bad_bundle", f"{bundle} is not a bundle (no meta.json)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["_bundle_dir"] = os.path.abspath(bundle)
    runtime = meta["runtime"]
    if runtime not in RUNTIMES:
        raise AgentError("bad_bundle", f"unknown runtime '{runtime}' (known: {', '.join(RUNTIMES)})")
    threads = int(threads or meta.get("threads") or os.cpu_count() or 1)
    batch_size = int(meta.get("batch_size", 1))
    model_path = os.path.join(bundle, meta["model"])

    import numpy as np

    with np.load(os.path.join(bundle, meta.get("eval", "eval.npz"))) as data:
        eval_x = data["x"]
        eval_y = data["y"] if "y" in data.files else None

    runtime_path, engine = model_path, None
    if runtime == "tensorrt" and model_path.endswith(".onnx"):
        precision = meta.get("precision")
        if precision not in TRT_PRECISIONS:
            raise AgentError("bad_bundle", f"meta.json precision must be one of {', '.join(TRT_PRECISIONS)} "
                                           f"for a TensorRT ONNX bundle, got {precision!r}")
        cache_dir = engine_cache or os.path.join(os.path.dirname(os.path.abspath(bundle)), "engine-cache")
        runtime_path, engine = cached_engine(model_path, precision, batch_size, cache_dir)

    start = time.perf_counter()
    model = RUNTIMES[runtime](runtime_path, threads, meta)
    init_s = time.perf_counter() - start

    sample = next(_batches(eval_x, batch_size))[0]
    for _ in range(warmup):
        model.run(sample)
    times, elapsed = _time_runs(model, sample, runs, min_seconds, max_seconds)
    postprocess = meta.get("postprocess")
    labelled = meta.get("labels", True)  # a bare model file is timed on synthetic inputs, without labels
    detections, accuracy = None, None
    if postprocess:  # a detector: decoded here, scored (mAP) by the host from the bundle's ground truth
        detections = _detect(model, eval_x, batch_size, postprocess, bundle)
    elif labelled:
        correct = _count_correct(model, eval_x, eval_y, batch_size)
        accuracy = {"top1": correct / len(eval_y), "correct": correct, "total": int(len(eval_y)),
                    "metric": "top-1", "value": correct / len(eval_y)}

    result = {
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
        "accuracy": accuracy,
        "device": device_facts(),
    }
    # latency under an emulator is not device latency; accuracy and outputs still are the device code's
    result["emulated"] = result["device"]["emulated"] is not None
    if engine is not None:
        result["engine"] = engine
    if postprocess:
        result["detections"] = detections
    return result


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile an edgeopt bundle on this device; prints JSON.")
    parser.add_argument("bundle", nargs="?", help="bundle directory (model, eval.npz, meta.json)")
    parser.add_argument("--facts", action="store_true", help="print device facts only")
    parser.add_argument("--runs", type=int, default=50, help="minimum number of timed runs")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum total timed seconds")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop timing after this long")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: meta.json)")
    parser.add_argument("--engine-cache", default=None,
                        help="TensorRT engine cache directory (default: engine-cache/ next to the bundle)")
    args = parser.parse_args(argv)
    try:
        if args.facts:
            result = device_facts()
        elif args.bundle is None:
            parser.error("BUNDLE_DIR is required unless --facts is given")
        else:
            if args.runs < 1 or args.warmup < 0 or args.min_seconds < 0:
                raise AgentError("bad_args", "--runs must be >= 1, --warmup and --min-seconds >= 0")
            result = profile(args.bundle, args.runs, args.min_seconds, args.max_seconds, args.warmup, args.threads,
                             args.engine_cache)
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
