#!/usr/bin/env bash
# Set up a Jetson (Orin Nano / AGX Orin, JetPack 6 = Ubuntu 22.04, Python 3.10) as an edgeopt device.
# Runs ON the device:   ssh orin-nano 'bash -s' < devices/setup-jetpack.sh
# Not tested on hardware by edgeopt's CI (no Jetson there); the steps follow NVIDIA's JetPack docs.
#
# What the agent needs for a `tensorrt` bundle (it builds the engine from the bundle's ONNX on the
# device and caches it under <workdir>/bundles/engine-cache/): TensorRT's Python bindings, which come
# from JetPack (apt python3-libnvinfer), not from PyPI, so the venv sees the system site-packages;
# and cuda-python (cudaMalloc/cudaMemcpy/streams without torch or pycuda). numpy stays < 2 because
# JetPack 6's compiled Python modules (TensorRT, NVIDIA's onnxruntime-gpu) are built against numpy 1.x.
# onnxruntime from PyPI is CPU-only on aarch64; for the
# CUDA/TensorRT execution providers install NVIDIA's onnxruntime-gpu wheel for your JetPack,
# e.g. from the Jetson AI Lab index:  ORT_GPU_INDEX=https://pypi.jetson-ai-lab.dev/jp6/cu126
# Idempotent; EDGEOPT_VENV picks another venv path (match `python:` in devices/inventory.yaml).
set -euo pipefail

VENV="${EDGEOPT_VENV:-$HOME/edgeopt-venv}"

sudo apt-get update -qq
sudo apt-get install -y -qq python3-venv python3-pip rsync python3-libnvinfer
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "numpy<2" "cuda-python>=12,<13"
if [ -n "${ORT_GPU_INDEX:-}" ]; then
  "$VENV/bin/pip" install -q --extra-index-url "$ORT_GPU_INDEX" "numpy<2" onnxruntime-gpu
else
  "$VENV/bin/pip" install -q "numpy<2" onnxruntime
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, platform
print("python", platform.python_version(), platform.machine())
for name in ("numpy", "tensorrt", "cuda-python", "onnxruntime", "onnxruntime-gpu"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
import tensorrt  # fails loudly if JetPack's bindings are missing
try:
    from cuda.bindings import runtime as cudart  # the same imports as the agent
except ImportError:
    from cuda import cudart
err, count = cudart.cudaGetDeviceCount()
assert err == cudart.cudaError_t.cudaSuccess and count > 0, f"no CUDA GPU visible: {err}"
prop = cudart.cudaGetDeviceProperties(0)[1]
print("tensorrt", tensorrt.__version__, "on", prop.name.decode(errors="replace").strip("\x00"),
      f"sm_{prop.major}{prop.minor}")
import onnxruntime
print("onnxruntime providers:", onnxruntime.get_available_providers())
PY

if command -v nvpmodel >/dev/null; then nvpmodel -q || true; fi
echo "For stable timings: sudo nvpmodel -m 0 && sudo jetson_clocks (the profiler reports the power mode)"
echo "done: set  python: ${VENV#"$HOME"/}/bin/python  for this device in devices/inventory.yaml"
