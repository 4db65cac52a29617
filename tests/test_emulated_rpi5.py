"""The emulated Raspberry Pi 5 (devices/emulated-rpi5.sh): real arm64 binaries over real SSH.

The shipped recipes' rpi5 bundles run on the board's aarch64 onnxruntime/LiteRT (XNNPACK's NEON
kernels, not AVX) and must reach the x86 accuracy within the precision's tolerance; the fused
scan kernel's tests run there too, compiled by numba for aarch64. `make test` starts the board
where it can (root, binfmt_misc); elsewhere these tests skip, except in CI (CI=true), where a
missing board fails them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeopt.profiler import Device, DeviceError, make_bundle, profile_bundle, ssh
from edgeopt.profiler.cli import devices
from edgeopt.profiler.inventory import INVENTORY_PATH, load_inventory
from edgeopt.profiler.runners import SSHRunner

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "devices" / "emulated-rpi5.sh"
EMU_DIR = Path(os.environ.get("EDGEOPT_EMU_DIR", "/var/cache/edgeopt/emulated-rpi5"))
# Beside regress's runs, sharing their step cache: the passes run once for both, and a second
# `make test` reuses them.
RUNS = ROOT / "runs" / "regress"
# The shipped recipes whose rpi5 bundle the board profiles, with the eval stride used there (every
# k-th sample of the eval split, on both architectures; 1 = all of it). The int8 VMamba's 540
# samples take ~2 min under qemu-user on a loaded 2-core host; a slower model (the detector, when
# it ships) may take a stride rather than stretch CI. The detector's bundle holds its 16 CI eval
# images at 128x128 and the numpy decode/NMS the board runs; it is scored by mAP50.
BOARD_RECIPES = {"digits-mlp": 1, "digits-vmamba": 1, "rgbt-det": 1}
# Top-1 points aarch64 may differ from x86 on the same bundle: float kernels may flip a
# near-tie (one eval sample = 0.19 points); int8 requantization rounds differently on NEON.
ARCH_TOLERANCE_POINTS = {"fp32": 0.2, "fp16": 0.5, "int8": 1.0, "mixed": 1.0}
EVAL_SAMPLES = {"digits-mlp": 540, "digits-vmamba": 540, "rgbt-det": 16}
TIMING = {"runs": 3, "min_seconds": 0.0, "warmup": 1}


@pytest.fixture(scope="module")
def board() -> Device:
    """The inventory's rpi5-emulated entry, or a skip (a failure in CI) when it does not answer."""
    proc = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True,
                          env={**os.environ, "EDGEOPT_EMU_DIR": str(EMU_DIR)})
    if proc.returncode != 0:
        reason = f"{proc.stderr.strip()} (make emulated-rpi5 starts it; needs root and binfmt_misc)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the emulated board: {reason}")
        pytest.skip(reason)
    device = load_inventory(INVENTORY_PATH).get("rpi5-emulated")
    return device.model_copy(update={"ssh_config": EMU_DIR / "ssh_config", "retries": 0})


def _with_config(device: Device, tmp_path: Path, **changes: str) -> Device:
    """The board with its ssh config edited (`Port 1234`, `UserKnownHostsFile x`), in tmp_path."""
    lines = (EMU_DIR / "ssh_config").read_text().splitlines()
    for key, value in changes.items():
        lines = [f"  {key} {value}" if line.strip().startswith(key + " ") else line for line in lines]
    config = tmp_path / "ssh_config"
    config.write_text("\n".join(lines) + "\n")
    return device.model_copy(update={"ssh_config": config})


def test_check_reports_aarch64_python_and_runtimes(board: Device, tmp_path: Path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(f"devices:\n  - {{name: rpi5-emulated, host: rpi5-emulated, profile: rpi5, "
                         f"ssh_config: {board.ssh_config}, python: {board.python}, emulated: true}}\n")
    result = CliRunner().invoke(devices, ["--inventory", str(inventory), "check", "rpi5-emulated"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps long rows
    assert "aarch64 (emulated: qemu-user" in output and f"cpu cortex-a76, on {platform.machine()})" in output
    assert "python: 3.11." in output and "edgeopt-venv/bin/python" in output
    assert "ai-edge-litert" in output and "onnxruntime" in output and "numpy" in output
    assert "Raspberry Pi 5 (emulated by qemu-user" in output  # the stand-in /proc/cpuinfo
    assert f"(aarch64 emulated on a {platform.machine()} host)" in output


@pytest.fixture(scope="module")
def rpi5_runs() -> dict[str, tuple[Path, str]]:
    """recipe -> (its rpi5 bundle, the final artifact's precision), made on this host."""
    from edgeopt.pipeline import Pipeline, Timing
    from edgeopt.profiles import load_profile
    from edgeopt.recipes import load_recipe

    made = {}
    for name, stride in BOARD_RECIPES.items():
        run_dir = RUNS / f"{name}-rpi5-emulated"
        steps = Pipeline(load_recipe(ROOT / "targets" / f"{name}.yaml"), load_profile("rpi5"), run_dir,
                         timing=Timing(warmup=1, runs=3, min_seconds=0.0)).run()
        made[name] = (_strided(run_dir / "bundle", stride), steps[-1].artifact.precision)
    return made


def _strided(bundle: Path, stride: int) -> Path:
    """The bundle with every `stride`-th eval sample (the bundle itself for 1)."""
    if stride == 1:
        return bundle
    import numpy as np

    meta = json.loads((bundle / "meta.json").read_text())
    with np.load(bundle / meta["eval"]) as data:
        x, y = data["x"][::stride], data["y"][::stride]
    return make_bundle(bundle / meta["model"], meta["runtime"], x, y, bundle.parent / f"bundle-every-{stride}",
                       threads=meta["threads"], batch_size=meta["batch_size"])


@pytest.mark.parametrize("recipe", BOARD_RECIPES)
def test_rpi5_bundle_accuracy_on_aarch64_matches_x86(board: Device, rpi5_runs, recipe: str):
    bundle, precision = rpi5_runs[recipe]
    x86 = profile_bundle(bundle, runner="local", **TIMING)
    arm = profile_bundle(bundle, device=board, **TIMING)
    assert arm["device"]["arch"] == "aarch64" and arm["device"]["emulated"]["guest_arch"] == "aarch64"
    assert arm["emulated"] is True and x86["emulated"] is False
    assert arm["accuracy"]["total"] == x86["accuracy"]["total"] == len(range(0, EVAL_SAMPLES[recipe], BOARD_RECIPES[recipe]))
    key = "map50" if arm["accuracy"].get("metric") == "mAP50" else "top1"
    gap = 100 * abs(arm["accuracy"][key] - x86["accuracy"][key])
    print(f"{recipe} rpi5 ({precision}, {arm['runtime']}, {arm['accuracy']['total']} eval samples): {key} "
          f"aarch64 {100 * arm['accuracy'][key]:.2f}% vs {platform.machine()} {100 * x86['accuracy'][key]:.2f}%")
    assert gap <= ARCH_TOLERANCE_POINTS[precision], (
        f"{recipe}: aarch64 {key} {arm['accuracy'][key]:.4f} vs x86 {x86['accuracy'][key]:.4f}")


def test_fused_scan_kernel_tests_pass_on_aarch64(board: Device, tmp_path: Path):
    """tests/test_scan_kernel_numpy.py with the kernel file beside it, run by the board's numba."""
    upload = tmp_path / "scan"
    upload.mkdir()
    (upload / "scan_kernel.py").write_bytes((ROOT / "edgeopt" / "ops" / "scan_kernel.py").read_bytes())
    (upload / "test_scan_kernel_numpy.py").write_bytes((ROOT / "tests" / "test_scan_kernel_numpy.py").read_bytes())
    remote = f"{board.workdir}/scan-kernel"
    ssh.upload_dir(board, upload, remote)
    python = ssh.remote_path(board.python)
    test = f"{remote}/test_scan_kernel_numpy.py"
    # numba's compiled-code cache outlives the upload, so a second run skips the slow emulated compile
    env = ["env", "NUMBA_CACHE_DIR=.cache/numba"]
    command = ssh.remote_command([*env, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                 [*env, python, test])
    proc = ssh.ssh(board, command, "running the fused-scan tests", timeout=900)
    output = proc.stdout.decode(errors="replace")
    print(output)
    assert proc.returncode == 0, output + proc.stderr.decode(errors="replace")
    assert "7 passed" in output and "aarch64 worst max rel error" in output


def test_moe_expert_kernels_built_for_aarch64_match_numpy_on_the_board(board: Device, tmp_path: Path):
    """edgeopt/ops/csrc/moe_experts.cpp cross-compiled for the Pi 5's Cortex-A76 (its `__fp16` path, not the x86
    intrinsics) computes fp16 / int4 experts and bf16 linears to 1e-5 of float64 numpy on the board."""
    import shutil

    from edgeopt.ops.build_kernels import BASE_FLAGS, MOE_SOURCE

    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross is None:
        reason = "no aarch64 cross compiler (apt install g++-aarch64-linux-gnu)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must cross-compile the MoE kernels: {reason}")
        pytest.skip(reason)
    upload = tmp_path / "moe"
    upload.mkdir()
    subprocess.run([cross, "-mcpu=cortex-a76", *BASE_FLAGS, str(MOE_SOURCE), "-o", str(upload / "libedgeopt_moe.so")],
                   check=True, capture_output=True)
    (upload / "check.py").write_bytes((ROOT / "tests" / "moe_kernels_check_numpy.py").read_bytes())
    remote = f"{board.workdir}/moe-kernels"
    ssh.upload_dir(board, upload, remote)
    command = ssh.remote_command([ssh.remote_path(board.python), f"{remote}/check.py", f"{remote}/libedgeopt_moe.so"])
    proc = ssh.ssh(board, command, "running the MoE kernel check", timeout=600)
    output = proc.stdout.decode(errors="replace")
    print(output)
    assert proc.returncode == 0, output + proc.stderr.decode(errors="replace")
    kinds = [line.split()[0] for line in output.splitlines() if " hidden " in line]
    assert sorted(kinds) == sorted(["f16", "q4", "bf16"] * 4) and "PASS" in output


def test_stopped_board_is_connection_refused(board: Device, rpi5_runs, tmp_path: Path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: the board's sshd as if stopped
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(DeviceError, match=r"device 'rpi5-emulated' \(rpi5-emulated\): connection refused") as err:
        profile_bundle(rpi5_runs["digits-mlp"][0], device=_with_config(board, tmp_path, Port=str(closed)),
                       **TIMING)
    assert "\n" not in str(err.value)


def test_wrong_host_key_is_refused(board: Device, tmp_path: Path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    port = (EMU_DIR / "port").read_text().strip()
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {other}\n")
    device = _with_config(board, tmp_path, UserKnownHostsFile=str(tmp_path / "known_hosts"))
    with pytest.raises(DeviceError, match=r"\(rpi5-emulated\): host key mismatch") as err:
        SSHRunner().facts(device)
    assert "\n" not in str(err.value)


def test_x86_only_runtime_bundle_is_a_missing_runtime(board: Device, tmp_path: Path):
    """A TensorRT bundle (x86/Jetson GPUs only) fails on the board as on a real Pi: one line."""
    import numpy as np
    import onnx as onnx_lib
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    path = tmp_path / "model.onnx"
    onnx_lib.save(helper.make_model(graph), path)
    x, y = np.eye(10, dtype=np.float32), np.arange(10)
    bundle = make_bundle(path, "tensorrt", x, y, tmp_path / "bundle", threads=1, precision="fp32")
    with pytest.raises(DeviceError, match=r"\(rpi5-emulated\): profiling failed: runtime 'tensorrt' is not "
                                          r"installed for /home/pi/edgeopt-venv/bin/python") as err:
        profile_bundle(bundle, device=board, **TIMING)
    assert "\n" not in str(err.value)


def test_script_refuses_a_non_root_user_in_one_line(tmp_path: Path):
    if os.geteuid() != 0:
        proc = subprocess.run([str(SCRIPT), "build"], capture_output=True, text=True,
                              env={**os.environ, "EDGEOPT_EMU_DIR": str(tmp_path)})
    else:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SCRIPT), "build"],
                              capture_output=True, text=True, env={**os.environ, "EDGEOPT_EMU_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "emulated-rpi5: needs root (debootstrap, chroot and mounts); run it with sudo"


def test_status_of_a_board_never_built_is_one_line(tmp_path: Path):
    proc = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True,
                          env={**os.environ, "EDGEOPT_EMU_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "emulated-rpi5: not running (start it with devices/emulated-rpi5.sh)"
