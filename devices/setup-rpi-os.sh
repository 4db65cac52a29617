#!/usr/bin/env bash
# Set up a Raspberry Pi (Raspberry Pi OS Bookworm 64-bit, Python 3.11) as an edgeopt device.
# Runs ON the device:   ssh rpi5 'bash -s' < devices/setup-rpi-os.sh
# Installs a venv with only what the profiling agent needs: numpy, ai-edge-litert, onnxruntime.
# Idempotent; EDGEOPT_VENV picks another venv path (match `python:` in devices/inventory.yaml).
set -euo pipefail

VENV="${EDGEOPT_VENV:-$HOME/edgeopt-venv}"

sudo apt-get update -qq
sudo apt-get install -y -qq python3-venv python3-pip rsync
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
"$VENV/bin/pip" install numpy ai-edge-litert onnxruntime

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
