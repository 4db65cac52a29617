#!/usr/bin/env bash
# Set up a Raspberry Pi (Raspberry Pi OS Bookworm 64-bit, Python 3.11) as an edgeopt device.
# Runs ON the device:   ssh rpi5 'bash -s' < devices/setup-rpi-os.sh
# Installs a venv with only what the profiling agent needs: numpy, ai-edge-litert, onnxruntime.
# Idempotent; EDGEOPT_VENV picks another venv path (match `python:` in devices/inventory.yaml).
# Optional ExecuTorch (format pte): EDGEOPT_PTE=1 also installs g++, executorch 1.4.x and torch 2.13.0
# (its Python runtime links libtorch); EDGEOPT_OPS_SRC=DIR then builds edgeopt's op library from the
# kernel sources in DIR (a deployed .pte bundle's ops/ directory) into ~/.cache/edgeopt/ops:
#   ssh rpi5 'EDGEOPT_PTE=1 EDGEOPT_OPS_SRC=~/edgeopt/bundle/ops bash -s' < devices/setup-rpi-os.sh
set -euo pipefail

VENV="${EDGEOPT_VENV:-$HOME/edgeopt-venv}"

sudo apt-get update -qq
sudo apt-get install -y -qq python3-venv python3-pip rsync
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install numpy ai-edge-litert onnxruntime
if [ "${EDGEOPT_PTE:-0}" = 1 ]; then
  sudo apt-get install -y -qq g++
  "$VENV/bin/pip" install 'executorch==1.4.*' torch==2.13.0
  "$VENV/bin/python" -c "import executorch.extension.pybindings.portable_lib"  # fails loudly if broken
  if [ -n "${EDGEOPT_OPS_SRC:-}" ]; then
    "$VENV/bin/python" "$EDGEOPT_OPS_SRC/build_kernels.py"  # g++ against this wheel's headers, no download
  fi
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, platform
print("python", platform.python_version(), platform.machine())
for name in ("numpy", "ai-edge-litert", "onnxruntime"):
    print(name, md.version(name))
from ai_edge_litert.interpreter import Interpreter  # noqa: F401  (fails loudly if the wheel is broken)
import onnxruntime  # noqa: F401
PY

governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo unknown)
echo "CPU governor: $governor (the profiler reports it; for stable timings consider 'performance')"
echo "done: set  python: ${VENV#"$HOME"/}/bin/python  for this device in devices/inventory.yaml"
