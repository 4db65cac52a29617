"""The device agent, bundles and the local runner, on a real digits model."""

from __future__ import annotations

import ast
import json
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
ALLOWED_LAZY = {"numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime", "tensorrt", "cuda"}


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
