"""Talking to a device through the system OpenSSH client (`ssh`, `scp`, `rsync`).

Going through the user's own `ssh` means `~/.ssh/config` just works: host
aliases, keys, agents, ProxyJump. We only add BatchMode (never prompt), a
connect timeout and keep-alives, and never weaken host-key checking. ssh hands
the remote command to the device's shell as one string, so every element is
quoted with shlex; locally everything is an argv list.

OpenSSH reports failures only as text on stderr with exit code 255, so
`explain_ssh_failure` maps the messages of OpenSSH 8-9 to one-line causes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from edgeopt.errors import InputError
from edgeopt.profiler.inventory import Device

SSH_FAILED = 255
COMMAND_NOT_FOUND = 127
RETRY_BACKOFF_S = 2.0

# (regex on ssh's stderr, cause, retry?) — first match wins.
_SSH_FAILURES: list[tuple[str, str, bool]] = [
    (r"Could not resolve hostname|Name or service not known|nodename nor servname",
     "DNS lookup failed: check the host name or the alias in your ssh config", False),
    (r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed",
     "host key mismatch: the device's key differs from known_hosts (re-imaged device, or someone "
     "in between?); verify it, then remove the old key with ssh-keygen -R", False),
    (r"No .* host key is known for|Host key verification failed",
     "host key unknown or rejected: connect once with plain `ssh` to verify and accept it", False),
    (r"Permission denied|Too many authentication failures",
     "authentication failed: check the user and key (ssh runs in batch mode, so a key needs "
     "ssh-agent or no passphrase)", False),
    (r"Bad configuration option|Can't open user config file|[Bb]ad owner or permissions|"
     r"configuration option|garbage at end of line|Unsupported option|no argument after keyword",
     "ssh configuration error", False),
    (r"Connection refused", "connection refused: is sshd running and is the port right?", True),
    (r"timed out|Connection timed out", "connection timed out: is the device on and reachable?", True),
    (r"No route to host|Network is unreachable", "no route to the device: check the network", True),
    (r"Connection reset|Connection closed by|kex_exchange_identification|Broken pipe",
     "connection dropped by the device", True),
]


class DeviceError(InputError):
    """A device could not be reached or could not run the profile; one line, exit code 2."""


def explain_ssh_failure(stderr: str) -> tuple[str, bool]:
    """(one-line cause, worth retrying) for an OpenSSH exit 255."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not set(ln.strip()) <= {"@"}]
    last = lines[-1] if lines else "no output"
    for pattern, cause, retry in _SSH_FAILURES:
        hit = next((ln for ln in lines if re.search(pattern, ln)), None)
        if hit is not None:
            return (f"{cause} ({hit})" if cause == "ssh configuration error" else cause), retry
    return f"{last}", False


def ssh_options(device: Device) -> list[str]:
    """Options shared by ssh, scp and rsync's ssh; nothing here weakens host-key checks."""
    opts: list[str] = []
    if device.ssh_config is not None:
        opts += ["-F", str(device.ssh_config)]
    opts += [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={device.connect_timeout_s}",
        "-o", "ServerAliveInterval=10",
        "-o", "ServerAliveCountMax=3",
    ]
    if device.port is not None:
        opts += ["-o", f"Port={device.port}"]
    if device.user is not None:
        opts += ["-o", f"User={device.user}"]
    return opts


def remote_path(path: str) -> str:
    """`~/x` → `x`: ssh, scp and rsync resolve relative paths in the remote home,
    while a quoted `~` would not expand."""
    if path in ("~", "~/"):
        return "."
    return path[2:] if path.startswith("~/") else path


def remote_command(*argvs: Sequence[str]) -> str:
    """Argv lists → one command string for the device's shell, each element quoted."""
    return " && ".join(shlex.join([str(a) for a in argv]) for argv in argvs)


def _where(device: Device) -> str:
    return f"device '{device.name}' ({device.host})"


def run_checked(device: Device, argv: list[str], what: str, *, stdin: bytes | None = None,
                timeout: float | None = None, remote_failure_ok: bool = False,
                ) -> subprocess.CompletedProcess[bytes]:
    """Run an ssh/scp/rsync argv, retrying connection failures.

    A connection failure (exit 255) is always a DeviceError; any other failure is
    one too unless `remote_failure_ok`, in which case the caller explains it.
    """
    timeout = timeout or device.timeout_s
    for attempt in range(device.retries + 1):
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            raise DeviceError(f"{argv[0]} not found on this machine: install the OpenSSH client") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{_where(device)}: timed out after {timeout:g} s while {what}") from None
        if proc.returncode == 0:
            return proc
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode != SSH_FAILED and remote_failure_ok:
            return proc
        cause, retry = explain_ssh_failure(stderr)
        if not (retry and attempt < device.retries):
            raise DeviceError(f"{_where(device)}: {cause} (while {what})")
        time.sleep(RETRY_BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")


def ssh(device: Device, command: str, what: str, *, stdin: bytes | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run one quoted command string on the device."""
    argv = ["ssh", *ssh_options(device), "--", device.host, command]
    return run_checked(device, argv, what, stdin=stdin, timeout=timeout, remote_failure_ok=True)


def ensure_ok(device: Device, proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    """Turn a failed remote command into a DeviceError naming the likely cause."""
    if proc.returncode == 0:
        return
    stderr = proc.stderr.decode(errors="replace").strip().splitlines()
    last = stderr[-1] if stderr else f"exit code {proc.returncode}"
    if proc.returncode == COMMAND_NOT_FOUND:
        last = f"command not found on the device ({last}); run devices/setup-*.sh or set `python:` in the inventory"
    raise DeviceError(f"{_where(device)}: {what} failed: {last}")


def rsync_available() -> bool:
    return shutil.which("rsync") is not None


def upload_dir(device: Device, local_dir: Path, remote_dir: str) -> None:
    """Mirror `local_dir` to `remote_dir` on the device: rsync if both ends have it, else scp."""
    remote_dir = remote_path(remote_dir)
    parent = str(Path(remote_dir).parent)
    if rsync_available():
        proc = ssh(device, remote_command(["mkdir", "-p", parent]), "creating the remote work directory")
        ensure_ok(device, proc, "creating the remote work directory")
        argv = ["rsync", "-a", "--delete", "-e", shlex.join(["ssh", *ssh_options(device)]),
                f"{local_dir}/", f"{device.host}:{remote_dir}/"]
        proc = run_checked(device, argv, "copying the bundle with rsync", remote_failure_ok=True)
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode == 0:
            return
        if not re.search(r"rsync: (command )?not found", stderr):
            raise DeviceError(f"{_where(device)}: copying the bundle with rsync failed: {explain_ssh_failure(stderr)[0]}")
        # the device has no rsync: fall back to scp
    proc = ssh(device, remote_command(["rm", "-rf", remote_dir], ["mkdir", "-p", parent]),
               "preparing the remote bundle directory")
    ensure_ok(device, proc, "preparing the remote bundle directory")
    argv = ["scp", "-q", "-r", *ssh_options(device), str(local_dir), f"{device.host}:{remote_dir}"]
    run_checked(device, argv, "copying the bundle with scp")
