#!/usr/bin/env bash
# Set up a Jetson (Orin Nano / AGX Orin, JetPack 6 = Ubuntu 22.04, Python 3.10) as an edgeopt device.
# Runs ON the device:   ssh orin-nano 'bash -s' < devices/setup-jetpack.sh
# Not tested on hardware by edgeopt's CI (no Jetson there); the steps follow NVIDIA's JetPack docs.
#
# TensorRT's Python bindings come from JetPack (apt python3-libnvinfer), not from PyPI, so the
# venv sees the system site-packages. onnxruntime from PyPI is CPU-only on aarch64; for the
# CUDA/TensorRT execution providers install NVIDIA's onnxruntime-gpu wheel for your JetPack,
# e.g. from the Jetson AI Lab index:  ORT_GPU_INDEX=https://pypi.jetson-ai-lab.dev/jp6/cu126
# Idempotent; EDGEOPT_VENV picks another venv path (match `python:` in devices/inventory.yaml).
set -euo pipefail

VENV="${EDGEOPT_VENV:-$HOME/edgeopt-venv}"

sudo apt-get update -qq
sudo apt-get install -y -qq python3-venv python3-pip rsync python3-libnvinfer
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install numpy "cuda-python>=12,<13"
if [ -n "${ORT_GPU_INDEX:-}" ]; then
  "$VENV/bin/pip" install --extra-index-url "$ORT_GPU_INDEX" onnxruntime-gpu
else
  "$VENV/bin/pip" install onnxruntime
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, platform
print("python", platform.python_version(), platform.machine())
for name in ("numpy", "tensorrt", "cuda-python", "onnxruntime", "onnxruntime-gpu"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
import tensorrt  # noqa: F401  (fails loudly if JetPack's bindings are missing)
import onnxruntime
print("onnxruntime providers:", onnxruntime.get_available_providers())
PY

if command -v nvpmodel >/dev/null; then nvpmodel -q || true; fi
echo "For stable timings: sudo nvpmodel -m 0 && sudo jetson_clocks (the profiler reports the power mode)"
echo "done: set  python: ${VENV#"$HOME"/}/bin/python  for this device in devices/inventory.yaml"
