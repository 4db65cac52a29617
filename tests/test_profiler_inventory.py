"""Device inventory, ssh argv safety, and the `devices` CLI + Makefile targets on the local runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from profiler_fixtures import DigitsModel, digits_model  # noqa: F401  (fixture)

from edgeopt.errors import InputError
from edgeopt.profiler import Device, make_bundle
from edgeopt.profiler.cli import devices
from edgeopt.profiler.inventory import INVENTORY_PATH, load_inventory
from edgeopt.profiler.runners import resolve_device
from edgeopt.profiler.ssh import explain_ssh_failure, remote_command, remote_path, ssh_options
from edgeopt.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]


def test_shipped_inventory_is_valid_and_names_real_profiles():
    inventory = load_inventory(INVENTORY_PATH)
    assert {d.name for d in inventory.devices} >= {"host", "rpi5", "orin-nano"}
    for device in inventory.devices:
        assert load_profile(device.profile).name == device.profile


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("devices:\n  - {name: a, host: h, profile: rpi5}\n  - {name: a, host: g, profile: rpi5}\n",
         "names must be unique; repeated: a"),
        ("devices:\n  - {name: a, host: -oProxyCommand=touch, profile: rpi5}\n", "field 'devices.0.host'"),
        ("devices:\n  - {name: a, host: h, profile: rpi5, workdir: '../x'}\n", "field 'devices.0.workdir'"),
        ("devices:\n  - {name: a, host: h, profile: rpi5, port: 70000}\n", "field 'devices.0.port'"),
        ("devices:\n  - {name: a, host: h, profile: rpi5, colour: red}\n", "field 'devices.0.colour'"),
    ],
)
def test_bad_inventory_is_a_one_line_error(tmp_path, yaml, message):
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml)
    with pytest.raises(InputError, match=message) as err:
        load_inventory(path)
    assert "\n" not in str(err.value)


def test_ssh_config_path_is_relative_to_the_inventory(tmp_path, monkeypatch):
    path = tmp_path / "inv.yaml"
    path.write_text("devices:\n  - {name: a, host: h, profile: rpi5, ssh_config: cfg/ssh_config}\n")
    assert load_inventory(path).devices[0].ssh_config == tmp_path / "cfg" / "ssh_config"
    with pytest.raises(InputError, match="unknown device 'b'"):
        resolve_device("b", path)  # an explicit inventory must name the device
    monkeypatch.setenv("EDGEOPT_INVENTORY", str(path))
    assert resolve_device("a").host == "h"
    assert resolve_device("my-alias").host == "my-alias"  # not in the inventory: a bare ssh alias
    with pytest.raises(InputError, match="neither an inventory device nor a valid ssh host"):
        resolve_device("-oProxyCommand=x")


def test_ssh_argv_keeps_host_key_checks_and_quotes_remote_commands(tmp_path):
    device = Device(name="a", host="pi", profile="rpi5", port=2222, user="me", ssh_config=tmp_path / "cfg")
    opts = ssh_options(device)
    assert opts[:2] == ["-F", str(tmp_path / "cfg")]
    assert "BatchMode=yes" in opts and "Port=2222" in opts and "User=me" in opts
    assert not any("StrictHostKeyChecking" in o or "UserKnownHostsFile" in o for o in opts)
    assert remote_command(["echo", "a b; rm -rf /"], ["ls", "$HOME"]) == "echo 'a b; rm -rf /' && ls '$HOME'"
    assert remote_path("~/edgeopt") == "edgeopt" and remote_path("/srv/e") == "/srv/e"


@pytest.mark.parametrize(
    ("stderr", "cause", "retry"),
    [
        ("ssh: Could not resolve hostname pi5: Name or service not known", "DNS lookup failed", False),
        ("ssh: connect to host 10.0.0.9 port 22: Connection timed out", "connection timed out", True),
        ("ssh: connect to host 127.0.0.1 port 1: Connection refused", "connection refused", True),
        ("me@pi: Permission denied (publickey).", "authentication failed", False),
        ("@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key verification failed.",
         "host key mismatch", False),
        ("No ED25519 host key is known for pi and you have requested strict checking.\n"
         "Host key verification failed.", "host key unknown", False),
        ("/x/cfg: line 3: Bad configuration option: hostnme\n/x/cfg: terminating, 1 bad configuration options",
         "ssh configuration error (/x/cfg: line 3: Bad configuration option: hostnme)", False),
    ],
)
def test_openssh_messages_map_to_causes(stderr, cause, retry):
    explained, should_retry = explain_ssh_failure(stderr)
    assert explained.startswith(cause) and should_retry is retry


@pytest.fixture()
def run_dir(digits_model: DigitsModel, tmp_path: Path) -> Path:  # noqa: F811
    run = tmp_path / "runs" / "digits-x86-cpu"
    make_bundle(digits_model.onnx_path, "onnxruntime", digits_model.eval_x, digits_model.eval_y,
                run / "bundle", threads=1, batch_size=32)
    return run


@pytest.fixture()
def local_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text("devices:\n  - {name: here, host: localhost, runner: local, profile: x86-cpu}\n")
    return path


def test_cli_list_check_and_profile_on_the_local_runner(run_dir, local_inventory, digits_model):  # noqa: F811
    cli = CliRunner()
    listed = cli.invoke(devices, ["--inventory", str(local_inventory), "list"])
    assert listed.exit_code == 0 and "here" in listed.output and "x86-cpu" in listed.output
    checked = cli.invoke(devices, ["--inventory", str(local_inventory), "check", "here"])
    assert checked.exit_code == 0, checked.output
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in checked.output
    profiled = cli.invoke(devices, ["--inventory", str(local_inventory), "profile", "here", str(run_dir),
                                    "--runs", "5", "--min-seconds", "0"])
    assert profiled.exit_code == 0, profiled.output
    result = json.loads((run_dir / "profile" / "here.json").read_text())
    assert result["accuracy"]["top1"] == pytest.approx(digits_model.numpy_top1, abs=1 / 540)
    assert f"{100 * result['accuracy']['top1']:.2f}%" in profiled.output
    missing = cli.invoke(devices, ["--inventory", str(local_inventory), "profile", "here", str(run_dir.parent)])
    assert isinstance(missing.exception, InputError) and "no bundle in" in str(missing.exception)


def test_make_targets_call_the_cli(run_dir, local_inventory):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    edgeopt = Path(sys.executable).with_name("edgeopt")
    base = ["make", "--no-print-directory", "-f", str(REPO / "devices" / "deploy.mk"), f"EDGEOPT={edgeopt}",
            f"INVENTORY={local_inventory}", "PROFILE_ARGS=--runs 5 --min-seconds 0"]
    usage = subprocess.run([*base, "profile", f"RUN={run_dir}"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode != 0 and "missing DEVICE=" in usage.stderr
    done = subprocess.run([*base, "profile-all", f"RUN={run_dir}"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    table = json.loads((run_dir / "profile" / "all.json").read_text())
    assert table["here"]["accuracy"]["top1"] > 0.9
    bad = subprocess.run([*base, "deploy", "DEVICE=her", f"RUN={run_dir}"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "unknown device 'her'; did you mean 'here'" in bad.stderr.replace("\n", " ")


def test_connection_failures_are_retried_but_auth_failures_are_not(monkeypatch):
    from edgeopt.profiler import ssh

    calls: list[list[str]] = []
    replies = {
        "refused": [(255, b"ssh: connect to host pi port 22: Connection refused"), (0, b"")],
        "auth": [(255, b"me@pi: Permission denied (publickey)."), (0, b"")],
    }

    def fake_run(argv, **kwargs):
        calls.append(argv)
        code, err = queue.pop(0)
        return subprocess.CompletedProcess(argv, code, b"ok", err)

    monkeypatch.setattr(ssh.subprocess, "run", fake_run)
    monkeypatch.setattr(ssh, "RETRY_BACKOFF_S", 0.0)
    device = Device(name="pi", host="pi", profile="rpi5", retries=2)
    queue = list(replies["refused"])
    assert ssh.ssh(device, "true", "testing").returncode == 0 and len(calls) == 2
    calls.clear()
    queue = list(replies["auth"])
    with pytest.raises(ssh.DeviceError, match="authentication failed"):
        ssh.ssh(device, "true", "testing")
    assert len(calls) == 1
