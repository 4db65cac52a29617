"""Test fixtures that stand in for an edge device: a real sshd on 127.0.0.1 and a
fresh virtual environment holding only the agent's runtime packages.

Import the fixtures into a test module (`from sshd_fixture import sshd, device_python`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SSHD = Path("/usr/sbin/sshd")
AGENT_PACKAGES = ("numpy", "onnxruntime", "ai-edge-litert")


def _closure(names: tuple[str, ...]) -> list:
    """The installed distributions `names` need, following non-extra requirements."""
    seen: dict[str, object] = {}
    todo = list(names)
    while todo:
        dist = distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def make_minimal_venv(root: Path, packages: tuple[str, ...] = AGENT_PACKAGES) -> Path:
    """A new venv (no system site-packages, no pip) whose site-packages holds exactly
    `packages` and their install requirements, symlinked from this environment.

    Symlinks stand in for `pip install` (no network, < 2 s); the interpreter cannot
    see torch or edgeopt at all, as on a freshly set-up Raspberry Pi.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for dist in _closure(packages):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            target = site / top
            if not target.exists():
                target.symlink_to(Path(dist.locate_file(top)).resolve())
    return python


@pytest.fixture(scope="session")
def device_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_minimal_venv(tmp_path_factory.mktemp("device-venv") / "venv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeopt-test", "-f", str(path)],
                   check=True)


@dataclass
class SSHServer:
    """A running sshd plus an ssh config whose aliases reach it in different ways."""

    root: Path
    port: int
    closed_port: int
    config: Path
    alias: str = "edge-test"  # correct host key
    bad_key_alias: str = "edge-badkey"  # known_hosts holds another key for it
    closed_alias: str = "edge-closed"  # nothing listens on its port


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """sshd on a free 127.0.0.1 port, as the current user, with its own keys."""
    if not SSHD.exists():
        pytest.skip("/usr/sbin/sshd not installed (apt-get install -y openssh-server)")
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@contextmanager
def running_sshd(root: Path) -> Iterator[SSHServer]:
    """Start sshd with fresh keys and an ssh config under `root`; stop it on exit."""
    root.chmod(0o700)
    for key in ("host_key", "other_host_key", "user_key"):
        _keygen(root / key)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port, closed_port = _free_port(), _free_port()
    (root / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    if os.geteuid() == 0:  # sshd started by root insists on its privilege-separation dir
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_pub = (root / "host_key.pub").read_text().split()[:2]
    other_pub = (root / "other_host_key.pub").read_text().split()[:2]
    (root / "known_hosts").write_text(f"edge-test {' '.join(host_pub)}\n")
    (root / "known_hosts_bad").write_text(f"edge-badkey {' '.join(other_pub)}\n")
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    common = f"""\
  HostName 127.0.0.1
  User {user}
  IdentityFile {root}/user_key
  IdentitiesOnly yes
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
"""
    config = root / "ssh_config"
    config.write_text(
        f"Host edge-test\n  Port {port}\n  HostKeyAlias edge-test\n  UserKnownHostsFile {root}/known_hosts\n{common}\n"
        f"Host edge-badkey\n  Port {port}\n  HostKeyAlias edge-badkey\n"
        f"  UserKnownHostsFile {root}/known_hosts_bad\n{common}\n"
        f"Host edge-closed\n  Port {closed_port}\n  HostKeyAlias edge-test\n"
        f"  UserKnownHostsFile {root}/known_hosts\n{common}"
    )
    config.chmod(0o600)
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start listening within 10 s") from None
                time.sleep(0.05)
        yield SSHServer(root=root, port=port, closed_port=closed_port, config=config)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root / "remote", ignore_errors=True)
