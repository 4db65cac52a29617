"""The device agent, bundles and the local runner, on a real digits model."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from profiler_fixtures import DigitsModel, digits_model, write_tflite  # noqa: F401  (fixture)
from sshd_fixture import device_python  # noqa: F401  (fixture)

from edgeopt.errors import InputError
from edgeopt.profiler import DeviceError, make_bundle, profile_bundle, profile_model, read_meta
from edgeopt.profiler.bundle import AGENT_PATH

FAST = {"runs": 10, "min_seconds": 0.0, "warmup": 1}
ALLOWED_LAZY = {"yolo_decode",  # the bundle's own numpy decoder (detector bundles)
                "numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime", "tensorrt", "cuda",
                "executorch", "torch"}  # torch: only ExecuTorch's Python runtime (.pte bundles) needs it


def _onnx_bundle(model: DigitsModel, out: Path, batch_size: int = 16) -> Path:
    return make_bundle(model.onnx_path, "onnxruntime", model.eval_x, model.eval_y, out, threads=1,
                       batch_size=batch_size)


def test_agent_imports_only_stdlib_at_top_and_runtimes_lazily():
    tree = ast.parse(AGENT_PATH.read_text(), feature_version=(3, 9))  # devices may run Python 3.9
    top, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            roots = {n.split(".")[0] for n in names}
            (top if node in tree.body else lazy).update(roots)
    assert top - {"__future__"} <= set(sys.stdlib_module_names), top
    assert lazy - set(sys.stdlib_module_names) <= ALLOWED_LAZY, lazy


def test_local_profile_reports_timing_memory_and_real_accuracy(digits_model, tmp_path):  # noqa: F811
    bundle = _onnx_bundle(digits_model, tmp_path / "bundle")
    result = profile_bundle(bundle, runs=30, min_seconds=0.2, warmup=3)
    assert result["accuracy"]["top1"] == pytest.approx(digits_model.numpy_top1, abs=1 / 540)
    assert result["accuracy"]["top1"] > 0.9 and result["accuracy"]["total"] == len(digits_model.eval_y)
    assert result["runs"] >= 30 and result["timed_seconds"] >= 0.2
    lat = result["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["init_ms"] > 0 and result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0
    # VmHWM, not ru_maxrss: this torch-laden test process must not leak into the child's peak
    assert result["peak_rss_mb"] < 300
    assert result["threads"] == 1 and result["batch_size"] == 16 and result["warmup"] == 3
    assert result["device"]["cores"] >= 1 and result["device"]["runtimes"]["onnxruntime"]
    assert result["model"]["sha256"] == read_meta(bundle)["model_sha256"]


def test_max_seconds_caps_the_run_count(digits_model, tmp_path):  # noqa: F811
    bundle = _onnx_bundle(digits_model, tmp_path / "bundle")
    result = profile_bundle(bundle, runs=10**9, min_seconds=0, warmup=0, max_seconds=0.2)
    assert 0.2 <= result["timed_seconds"] < 2 and result["runs"] < 10**9


def test_batch_size_does_not_change_accuracy(digits_model, tmp_path):  # noqa: F811
    one = profile_bundle(_onnx_bundle(digits_model, tmp_path / "b1", batch_size=1), **FAST)
    odd = profile_bundle(_onnx_bundle(digits_model, tmp_path / "b7", batch_size=7), **FAST)  # 540 % 7 != 0
    assert one["accuracy"] == odd["accuracy"]


def test_agent_in_minimal_venv_never_imports_torch(digits_model, device_python, tmp_path):  # noqa: F811
    """A fresh venv with only numpy, onnxruntime, ai-edge-litert (+ their requirements):
    torch and edgeopt are not even importable there, and the agent still works."""
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('edgeopt'))"
    assert subprocess.run([str(device_python), "-I", "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split() == ["None", "None"]
    bundle = _onnx_bundle(digits_model, tmp_path / "bundle")
    wrapper = (
        "import runpy, sys\n"
        "bundle = sys.argv[1]\n"
        "sys.argv = [bundle + '/agent.py', bundle, '--runs', '5', '--min-seconds', '0']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'edgeopt'))\n"
        "assert not bad, bad\n"
        "print('NO-TORCH-OK', file=sys.stderr)\n"
    )
    proc = subprocess.run([str(device_python), "-I", "-c", wrapper, str(bundle)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "NO-TORCH-OK" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["accuracy"] == profile_bundle(bundle, **FAST)["accuracy"]
    assert result["device"]["python_executable"] == str(device_python)


@pytest.fixture(scope="module")
def tflite_path(digits_model, tmp_path_factory) -> Path:  # noqa: F811
    return write_tflite(digits_model.weight, digits_model.bias, tmp_path_factory.mktemp("tfl") / "digits.tflite")


def test_tflite_bundle_matches_onnx_accuracy_in_minimal_venv(digits_model, tflite_path, device_python,  # noqa: F811
                                                             tmp_path):
    onnx_acc = profile_bundle(_onnx_bundle(digits_model, tmp_path / "onnx"), **FAST)["accuracy"]["top1"]
    for batch_size in (1, 32):  # 32: the agent resizes the model's fixed batch-1 input
        bundle = make_bundle(tflite_path, "tflite", digits_model.eval_x, digits_model.eval_y,
                             tmp_path / f"tfl{batch_size}", threads=1, batch_size=batch_size)
        proc = subprocess.run([str(device_python), "-I", str(bundle / "agent.py"), str(bundle), "--runs", "5",
                               "--min-seconds", "0"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        assert result["runtime"] == "tflite" and result["runtime_version"] == "2.3.0"
        assert result["accuracy"]["top1"] == pytest.approx(onnx_acc, abs=1 / 540)
        assert result["accuracy"]["top1"] > 0.9


def test_profile_model_bundles_then_profiles(digits_model, tmp_path):  # noqa: F811
    result = profile_model(digits_model.onnx_path, "onnxruntime", digits_model.eval_x, digits_model.eval_y,
                           threads=1, work_dir=tmp_path, batch_size=32, **FAST)
    assert (tmp_path / "bundle" / "meta.json").is_file()
    assert result["accuracy"]["top1"] > 0.9 and result["target"]["runner"] == "local"


def test_bundle_rejects_bad_input_with_one_line(digits_model, tmp_path):  # noqa: F811
    m = digits_model
    cases = [
        (dict(runtime="onnxrt"), "did you mean 'onnxruntime'"),
        (dict(runtime="tflite"), "expects a .tflite file"),
        (dict(model_path=tmp_path / "missing.onnx"), "model file not found"),
        (dict(eval_y=m.eval_y[:-1]), "eval_y must have shape"),
        (dict(eval_y=m.eval_y.astype(np.float32)), "integer class labels"),
        (dict(threads=0), "threads and batch_size must be >= 1"),
    ]
    for override, message in cases:
        kwargs = dict(model_path=m.onnx_path, runtime="onnxruntime", eval_x=m.eval_x, eval_y=m.eval_y,
                      out_dir=tmp_path / "bundle", threads=1) | override
        with pytest.raises(InputError, match=message) as err:
            make_bundle(**kwargs)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "bundle").exists()


def test_failed_rewrite_keeps_the_old_bundle(digits_model, tmp_path, monkeypatch):  # noqa: F811
    bundle = _onnx_bundle(digits_model, tmp_path / "bundle")
    before = read_meta(bundle)

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        _onnx_bundle(digits_model, tmp_path / "bundle", batch_size=4)
    assert read_meta(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp dirs left behind


def test_broken_model_is_a_one_line_device_error(digits_model, tmp_path):  # noqa: F811
    bundle = _onnx_bundle(digits_model, tmp_path / "bundle")
    (bundle / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(DeviceError, match="localhost: profiling failed: .*") as err:
        profile_bundle(bundle, **FAST)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not a profiler bundle"):
        profile_bundle(tmp_path, **FAST)


# ---------------------------------------------------------------- TensorRT bundles (no GPU in CI)
# The engine build and timing on a GPU are untested on hardware; these cover everything around them.


@pytest.fixture(scope="module")
def fp16_onnx(digits_model, tmp_path_factory) -> Path:  # noqa: F811
    from edgeopt.quantize.onnx_quant import convert_fp16

    return convert_fp16(digits_model.onnx_path, tmp_path_factory.mktemp("fp16") / "digits_fp16.onnx")


def _trt_bundle(model: DigitsModel, onnx_path: Path, out: Path, **kwargs) -> Path:
    return make_bundle(onnx_path, "tensorrt", model.eval_x, model.eval_y, out, threads=6, batch_size=8, **kwargs)


def test_tensorrt_bundle_carries_the_onnx_and_its_precision(digits_model, fp16_onnx, tmp_path):  # noqa: F811
    from edgeopt.profiler.agent import _sha256

    bundle = _trt_bundle(digits_model, fp16_onnx, tmp_path / "fp16")
    meta = read_meta(bundle)
    assert meta["runtime"] == "tensorrt" and meta["model"] == "model.onnx" and meta["precision"] == "fp16"
    assert meta["model_sha256"] == _sha256(str(fp16_onnx)) and meta["batch_size"] == 8
    assert sorted(p.name for p in bundle.iterdir()) == ["agent.py", "eval.npz", "meta.json", "model.onnx"]
    # the precision decides the engine, so it is part of the bundle's identity
    as_fp32 = read_meta(_trt_bundle(digits_model, fp16_onnx, tmp_path / "fp32", precision="fp32"))
    assert as_fp32["precision"] == "fp32" and as_fp32["bundle_id"] != meta["bundle_id"]
    # the same file for onnxruntime carries no precision
    assert "precision" not in read_meta(_onnx_bundle(digits_model, tmp_path / "ort"))


def test_tensorrt_bundle_refuses_what_tensorrt_cannot_build(digits_model, fp16_onnx, tmp_path):  # noqa: F811
    for precision, message in [("int8", "need a Q/DQ ONNX model"), ("fp8", "unknown TensorRT precision 'fp8'")]:
        with pytest.raises(InputError, match=message):
            _trt_bundle(digits_model, fp16_onnx, tmp_path / "bundle", precision=precision)
    assert not (tmp_path / "bundle").exists()


def test_engine_cache_key_covers_onnx_precision_tensorrt_gpu_and_batch():
    from edgeopt.profiler.agent import engine_cache_key

    base = ("ab" * 32, "fp16", "10.3.0", "Orin (nvgpu) sm_87", (1, 8, 8))
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base) and re.fullmatch(r"[A-Za-z0-9.-]+\.engine", key), key
    assert key.startswith("fp16-trt10.3.0-Orin-nvgpu-sm-87-"), key  # readable in `ls engine-cache/`
    variants = [("cd" * 32, *base[1:]), (base[0], "int8", *base[2:]), (*base[:2], "10.7.0", *base[3:]),
                (*base[:3], "NVIDIA H100 sm_90", base[4]), (*base[:4], (1, 16, 16))]
    assert len({engine_cache_key(*v) for v in variants} | {key}) == len(variants) + 1


# Fake modules for the agent's subprocess: None blocks an import; a tensorrt module without a
# GPU behind it, and cuda-python's runtime returning "no device" as the real one does.
BLOCK_TENSORRT = "sys.modules['tensorrt'] = None\n"
FAKE_TENSORRT_NO_CUDA = (
    "import types\nsys.modules['tensorrt'] = types.ModuleType('tensorrt')\nsys.modules['cuda'] = None\n"
)
FAKE_TENSORRT_NO_GPU = (
    "import enum, types\n"
    "class cudaError_t(enum.IntEnum):\n    cudaSuccess = 0\n    cudaErrorNoDevice = 100\n"
    "rt = types.ModuleType('cuda.bindings.runtime')\n"
    "rt.cudaError_t = cudaError_t\n"
    "rt.cudaGetDeviceCount = lambda: (cudaError_t.cudaErrorNoDevice, 0)\n"
    "cuda, bindings = types.ModuleType('cuda'), types.ModuleType('cuda.bindings')\n"
    "cuda.bindings, bindings.runtime = bindings, rt\n"
    "sys.modules.update({'tensorrt': types.ModuleType('tensorrt'), 'cuda': cuda, 'cuda.bindings': bindings,\n"
    "                    'cuda.bindings.runtime': rt})\n"
)


def _agent_with(prelude: str, bundle: Path) -> subprocess.CompletedProcess:
    wrapper = (
        "import runpy, sys\n" + prelude +
        "sys.argv = [sys.argv[1] + '/agent.py', sys.argv[1], '--runs', '2', '--min-seconds', '0']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", wrapper, str(bundle)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("prelude, expected", [
    (BLOCK_TENSORRT, ["runtime 'tensorrt' is not installed", "sudo apt install python3-libnvinfer",
                      "pip install tensorrt", "cuda-python", "devices/setup-jetpack.sh"]),
    (FAKE_TENSORRT_NO_CUDA, ["'cuda-python' (GPU buffers for the tensorrt runtime) is not installed",
                             "pip install 'cuda-python>=12,<13'"]),
    (FAKE_TENSORRT_NO_GPU, ["no CUDA GPU is visible", "cudaErrorNoDevice, 0 devices", "NVIDIA GPU with its driver"]),
], ids=["no-tensorrt", "no-cuda-python", "no-gpu"])
def test_tensorrt_bundle_without_tensorrt_or_gpu_is_one_line_json(digits_model, fp16_onnx, tmp_path,  # noqa: F811
                                                                   prelude, expected):
    bundle = _trt_bundle(digits_model, fp16_onnx, tmp_path / "bundle")
    proc = _agent_with(prelude, bundle)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # AGENT_ERROR_EXIT, as for any missing runtime
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["kind"] == "missing_runtime", result
    for text in expected:
        assert text in result["error"], (text, result["error"])
    assert not (tmp_path / "engine-cache").exists()  # nothing built, nothing cached


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="this host has TensorRT")
def test_tensorrt_bundle_through_the_local_runner_is_a_one_line_device_error(digits_model, fp16_onnx,  # noqa: F811
                                                                               tmp_path):
    bundle = _trt_bundle(digits_model, fp16_onnx, tmp_path / "bundle")
    with pytest.raises(DeviceError, match=r"^localhost: profiling failed: runtime 'tensorrt' is not installed") as err:
        profile_bundle(bundle, **FAST)
    assert "\n" not in str(err.value)


class _FakeTensorRT:
    """Just enough of the tensorrt 10 builder API to record what the agent asks of it (no GPU here).
    It checks the agent's own logic (flags per precision, batch profile, engine cache), not TensorRT."""

    __version__ = "10.3.0"
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    NetworkDefinitionCreationFlag = type("Flags", (), {})  # TensorRT 10: no EXPLICIT_BATCH needed
    MemoryPoolType = type("Pools", (), {"WORKSPACE": "workspace"})
    BuilderFlag = type("BuilderFlag", (), {"FP16": "FP16", "INT8": "INT8"})

    def __init__(self, input_shape: tuple) -> None:
        self.builds: list[dict] = []
        fake = self

        class Config:
            def __init__(self) -> None:
                self.flags, self.profiles = set(), []

            def set_memory_pool_limit(self, pool, size) -> None:
                self.workspace = size

            def set_flag(self, flag) -> None:
                self.flags.add(flag)

            def add_optimization_profile(self, profile) -> None:
                self.profiles.append(profile.shapes)

        class Profile:
            def __init__(self) -> None:
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi) -> None:
                self.shapes[name] = (lo, opt, hi)

        class Network:
            num_inputs = 1

            def get_input(self, i):
                return type("Tensor", (), {"name": "x", "shape": input_shape})()

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags):
                return Network()

            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                fake.builds.append({"flags": config.flags, "profiles": config.profiles})
                return b"engine:" + ",".join(sorted(config.flags)).encode()

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:
                pass

            def parse_from_file(self, path) -> bool:
                return path.endswith(".onnx")

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def fake_gpu(monkeypatch):
    import enum
    import types

    class cudaError_t(enum.IntEnum):  # noqa: N801  (cuda-python's name)
        cudaSuccess = 0

    props = types.SimpleNamespace(name=b"Orin (nvgpu)\x00", major=8, minor=7)
    rt = types.SimpleNamespace(cudaError_t=cudaError_t, cudaGetDeviceCount=lambda: (cudaError_t.cudaSuccess, 1),
                               cudaGetDeviceProperties=lambda i: (cudaError_t.cudaSuccess, props))
    bindings = types.SimpleNamespace(runtime=rt)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)

    def install(input_shape: tuple = (-1, 64)) -> _FakeTensorRT:
        trt = _FakeTensorRT(input_shape)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


def test_engine_is_built_once_per_key_with_the_precision_flags(digits_model, fp16_onnx, fake_gpu,  # noqa: F811
                                                               tmp_path):
    from edgeopt.profiler.agent import cached_engine, engine_cache_key

    trt = fake_gpu()
    cache = tmp_path / "engine-cache"
    path, facts = cached_engine(str(fp16_onnx), "fp16", 8, str(cache))
    assert trt.builds == [{"flags": {"FP16"}, "profiles": [{"x": ((1, 64), (8, 64), (8, 64))}]}]
    assert facts["gpu"] == "Orin (nvgpu) sm_87" and not facts["cached"] and facts["batch_profile"] == [1, 8, 8]
    assert facts["size_bytes"] == len(b"engine:FP16")
    key = engine_cache_key(read_meta(_trt_bundle(digits_model, fp16_onnx, tmp_path / "b"))["model_sha256"],
                           "fp16", "10.3.0", "Orin (nvgpu) sm_87", (1, 8, 8))
    assert Path(path) == cache / key and Path(path).read_bytes() == b"engine:FP16"
    again, facts = cached_engine(str(fp16_onnx), "fp16", 8, str(cache))
    assert again == path and facts["cached"] and len(trt.builds) == 1  # a hit never rebuilds
    cached_engine(str(fp16_onnx), "fp32", 8, str(cache))
    assert trt.builds[-1]["flags"] == set() and len(list(cache.iterdir())) == 2


def test_int8_engine_flags_and_refusals(digits_model, fake_gpu, tmp_path):  # noqa: F811
    from edgeopt.profiler.agent import AgentError, build_engine

    qdq = tmp_path / "qdq.onnx"
    qdq.write_bytes(b"...QuantizeLinear...")  # the agent only sniffs for Q/DQ; the fake parser reads nothing
    trt = fake_gpu()
    assert build_engine(str(qdq), "int8", 1, 4, 4) == b"engine:FP16,INT8"
    assert build_engine(str(qdq), "mixed", 1, 4, 4) == b"engine:INT8"  # float layers stay fp32
    with pytest.raises(AgentError, match="int8 TensorRT engines need a Q/DQ ONNX model"):
        build_engine(str(digits_model.onnx_path), "int8")
    fake_gpu((-1, -1))
    with pytest.raises(AgentError, match="dynamic dimensions .* beyond the batch"):
        build_engine(str(digits_model.onnx_path), "fp16")
    assert len(trt.builds) == 2
