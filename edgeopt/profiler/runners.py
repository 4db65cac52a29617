"""Runners put a bundle on a device, run the agent there and bring back its JSON.

`local` runs the agent in a subprocess with this interpreter (CI, the host
profile); `ssh` goes through the system OpenSSH client. Third-party runners
register in the `edgeopt.runners` entry-point group: a class with the methods
of `Runner`, constructed without arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from edgeopt.errors import InputError
from edgeopt.profiler import ssh
from edgeopt.profiler.bundle import AGENT_PATH, make_bundle, read_meta
from edgeopt.profiler.inventory import Device, default_inventory_path, load_inventory
from edgeopt.profiler.ssh import DeviceError
from edgeopt.registry import Registry

AGENT_ERROR_EXIT = 3  # agent.py's exit code for a reported failure
LOCAL_TIMEOUT_S = 900.0


class Runner(Protocol):
    def deploy(self, bundle_dir: Path, device: Device | None) -> str:
        """Put the bundle where the device can run it; return that location."""

    def profile(self, bundle_dir: Path, device: Device | None, agent_args: list[str]) -> dict[str, Any]:
        """Run the agent on the bundle and return its JSON."""

    def facts(self, device: Device | None) -> dict[str, Any]:
        """The agent's `--facts` JSON (reachability, arch, Python, runtimes, memory)."""


RUNNERS: Registry[type[Runner]] = Registry("runner", "edgeopt.runners")


def parse_agent_output(proc: subprocess.CompletedProcess[bytes], where: str, what: str) -> dict[str, Any]:
    """The agent's JSON, or a DeviceError with the agent's own one-line reason."""
    stdout = proc.stdout.decode(errors="replace").strip()
    last = stdout.splitlines()[-1] if stdout else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = None
    if isinstance(result, dict) and "error" in result:
        raise DeviceError(f"{where}: {what} failed: {result['error']}")
    if proc.returncode != 0 or not isinstance(result, dict):
        stderr = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = stderr[-1] if stderr else f"exit code {proc.returncode}, no JSON on stdout"
        if proc.returncode == ssh.COMMAND_NOT_FOUND:
            reason = f"command not found on the device ({reason}); run devices/setup-*.sh or set `python:`"
        raise DeviceError(f"{where}: {what} failed: {reason}")
    return result


@RUNNERS.register("local")
class LocalRunner:
    """The agent in a subprocess of this interpreter, on this machine."""

    def deploy(self, bundle_dir: Path, device: Device | None) -> str:
        return str(Path(bundle_dir).resolve())

    def _run(self, argv: list[str], what: str, timeout: float) -> dict[str, Any]:
        try:
            proc = subprocess.run([sys.executable, *argv], capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"localhost: {what} timed out after {timeout:g} s") from None
        return parse_agent_output(proc, "localhost", what)

    def profile(self, bundle_dir: Path, device: Device | None, agent_args: list[str]) -> dict[str, Any]:
        bundle_dir = Path(bundle_dir).resolve()
        timeout = device.timeout_s if device else LOCAL_TIMEOUT_S
        return self._run([str(bundle_dir / "agent.py"), str(bundle_dir), *agent_args], "profiling", timeout)

    def facts(self, device: Device | None) -> dict[str, Any]:
        return self._run([str(AGENT_PATH), "--facts"], "reading device facts", 60.0)


@RUNNERS.register("ssh")
class SSHRunner:
    """The agent on a device reached with the system OpenSSH client."""

    @staticmethod
    def _require(device: Device | None) -> Device:
        if device is None:
            raise DeviceError("the ssh runner needs a device (an inventory name or an ssh host alias)")
        return device

    def deploy(self, bundle_dir: Path, device: Device | None) -> str:
        device = self._require(device)
        remote_dir = f"{ssh.remote_path(device.workdir)}/bundles/{read_meta(bundle_dir)['bundle_id']}"
        ssh.upload_dir(device, Path(bundle_dir), remote_dir)
        return remote_dir

    def profile(self, bundle_dir: Path, device: Device | None, agent_args: list[str]) -> dict[str, Any]:
        device = self._require(device)
        remote_dir = self.deploy(bundle_dir, device)
        command = ssh.remote_command([ssh.remote_path(device.python), f"{remote_dir}/agent.py", remote_dir, *agent_args])
        proc = ssh.ssh(device, command, "profiling")
        return parse_agent_output(proc, f"device '{device.name}' ({device.host})", "profiling")

    def facts(self, device: Device | None) -> dict[str, Any]:
        """Streams agent.py over stdin (`python -`), so nothing needs to be copied first."""
        device = self._require(device)
        command = ssh.remote_command([ssh.remote_path(device.python), "-", "--facts"])
        proc = ssh.ssh(device, command, "reading device facts", stdin=AGENT_PATH.read_bytes(), timeout=120)
        return parse_agent_output(proc, f"device '{device.name}' ({device.host})", "reading device facts")


def resolve_device(device: Device | str | None, inventory: Path | None = None) -> Device | None:
    """A Device as given, an inventory entry by name, or else a bare ssh host alias."""
    if device is None or isinstance(device, Device):
        return device
    path = Path(inventory) if inventory is not None else default_inventory_path()
    if path.is_file():
        inv = load_inventory(path)
        if inventory is not None or device in [d.name for d in inv.devices]:
            return inv.get(device)
    try:
        return Device(name=device, host=device, profile="unknown")
    except ValidationError:
        raise InputError(f"'{device}' is neither an inventory device nor a valid ssh host name") from None


def agent_args(runs: int, min_seconds: float, warmup: int, threads: int | None, max_seconds: float) -> list[str]:
    args = ["--runs", str(runs), "--min-seconds", str(min_seconds), "--warmup", str(warmup),
            "--max-seconds", str(max_seconds)]
    return args + (["--threads", str(threads)] if threads is not None else [])


def profile_bundle(
    bundle_dir: Path,
    runner: str | None = None,
    device: Device | str | None = None,
    runs: int = 50,
    min_seconds: float = 1.0,
    warmup: int = 5,
    threads: int | None = None,
    max_seconds: float = 150.0,
    inventory: Path | None = None,
) -> dict[str, Any]:
    """Profile a bundle on a device and return the agent's JSON (plus `target`).

    `runner` defaults to the device's runner, or `local` when no device is given.
    `threads` overrides the bundle's thread count.
    """
    read_meta(bundle_dir)
    dev = resolve_device(device, inventory)
    name = runner or (dev.runner if dev else "local")
    result = RUNNERS.get(name)().profile(Path(bundle_dir), dev, agent_args(runs, min_seconds, warmup, threads, max_seconds))
    result["emulated"] = bool(result.get("emulated")) or bool(dev and dev.emulated)
    result["target"] = {"runner": name, "device": dev.name if dev else "localhost",
                        "profile": dev.profile if dev else None}
    if "detections" in result:  # a detector bundle: mAP on the host, from the device's own detections
        from edgeopt.profiler.detections import score_bundle

        result["accuracy"] = score_bundle(Path(bundle_dir), result.pop("detections"))
    return result


def is_emulated(result: dict[str, Any]) -> bool:
    """True for a profile measured under an emulator: its latency and memory are the
    emulator's, never comparable with a device's figures or budgets."""
    return bool(result.get("emulated"))


def profile_model(
    model_path: Path,
    runtime: str,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    threads: int,
    work_dir: Path,
    runner: str | None = None,
    device: Device | str | None = None,
    batch_size: int = 1,
    input_name: str | None = None,
    labelled: bool = True,
    targets: list | None = None,
    postprocess: dict | None = None,
    **timing: Any,
) -> dict[str, Any]:
    """make_bundle into `work_dir/bundle`, then profile_bundle; `timing` = runs, min_seconds, ...
    (a detector passes eval_y=None, targets and postprocess: see `make_bundle`)."""
    bundle = make_bundle(model_path, runtime, eval_x, eval_y, Path(work_dir) / "bundle", threads,
                         input_name=input_name, batch_size=batch_size, labelled=labelled, targets=targets,
                         postprocess=postprocess)
    return profile_bundle(bundle, runner=runner, device=device, **timing)
