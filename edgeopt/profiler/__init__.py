"""On-device profiling: bundle an artifact, run the agent on a device, get JSON back.

    bundle = make_bundle("model.onnx", "onnxruntime", x, y, "runs/x/bundle", threads=4)
    result = profile_bundle(bundle, device="rpi5")   # inventory name or ssh alias
    result["latency_ms"]["p50"], result["accuracy"]["top1"]
"""

from edgeopt.profiler.bundle import make_bundle, read_meta
from edgeopt.profiler.inventory import Device, Inventory, load_inventory
from edgeopt.profiler.runners import RUNNERS, profile_bundle, profile_model
from edgeopt.profiler.ssh import DeviceError

__all__ = [
    "RUNNERS",
    "Device",
    "DeviceError",
    "Inventory",
    "load_inventory",
    "make_bundle",
    "profile_bundle",
    "profile_model",
    "read_meta",
]
