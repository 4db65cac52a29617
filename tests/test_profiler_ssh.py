"""The SSH runner against a real sshd on 127.0.0.1, reached through an ssh config alias.

The "device" runs the agent with a fresh venv that holds only numpy, onnxruntime
and ai-edge-litert, so these tests also prove the agent needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from profiler_fixtures import DigitsModel, digits_model  # noqa: F401  (fixture)
from sshd_fixture import SSHServer, device_python, sshd  # noqa: F401  (fixtures)

from edgeopt.profiler import Device, DeviceError, make_bundle, profile_bundle
from edgeopt.profiler.cli import devices
from edgeopt.profiler.runners import SSHRunner

TIMING = {"runs": 20, "min_seconds": 0.05, "warmup": 2}


def _device(server: SSHServer, python: Path, alias: str | None = None, **extra) -> Device:
    return Device(name="edge", host=alias or server.alias, profile="host", ssh_config=server.config,
                  workdir=str(server.root / "remote"), python=str(python), retries=0, **extra)


@pytest.fixture(scope="module")
def bundle(digits_model: DigitsModel, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("ssh-bundle") / "bundle"
    return make_bundle(digits_model.onnx_path, "onnxruntime", digits_model.eval_x, digits_model.eval_y,
                       out, threads=1, batch_size=16)


@pytest.fixture(scope="module")
def local_result(bundle: Path) -> dict:
    return profile_bundle(bundle, runner="local", **TIMING)


def test_ssh_profile_matches_local_accuracy_exactly(sshd, device_python, bundle, local_result,  # noqa: F811
                                                    digits_model):  # noqa: F811
    remote = profile_bundle(bundle, runner="ssh", device=_device(sshd, device_python), **TIMING)
    assert remote["accuracy"] == local_result["accuracy"]
    assert remote["accuracy"]["top1"] == pytest.approx(digits_model.numpy_top1, abs=1 / 540)
    assert remote["accuracy"]["top1"] > 0.9 and remote["accuracy"]["total"] == 540
    assert remote["target"] == {"runner": "ssh", "device": "edge", "profile": "host"}
    # it really ran in the device venv, from the copied bundle
    assert remote["device"]["python_executable"] == str(device_python)
    assert "torch" not in remote["device"]["runtimes"]
    assert remote["runs"] >= 20 and remote["latency_ms"]["p99"] >= remote["latency_ms"]["p50"] > 0
    copied = sshd.root / "remote" / "bundles" / remote["bundle_id"]
    assert (copied / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()


def test_scp_is_used_when_rsync_is_missing(sshd, device_python, bundle, local_result, tmp_path,  # noqa: F811
                                           monkeypatch):
    from edgeopt.profiler import ssh

    monkeypatch.setattr(ssh, "rsync_available", lambda: False)
    device = _device(sshd, device_python).model_copy(update={"workdir": str(tmp_path / "scp")})
    for _ in range(2):  # the second upload replaces the first
        remote = profile_bundle(bundle, runner="ssh", device=device, **TIMING)
        assert remote["accuracy"] == local_result["accuracy"]
    copied = tmp_path / "scp" / "bundles" / remote["bundle_id"]
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in bundle.iterdir())


def test_wrong_host_key_is_refused(sshd, device_python, bundle):  # noqa: F811
    with pytest.raises(DeviceError, match=r"device 'edge' \(edge-badkey\): host key mismatch") as err:
        profile_bundle(bundle, runner="ssh", device=_device(sshd, device_python, sshd.bad_key_alias), **TIMING)
    assert "\n" not in str(err.value)


def test_unreachable_port_says_connection_refused(sshd, device_python, bundle):  # noqa: F811
    with pytest.raises(DeviceError, match=r"\(edge-closed\): connection refused") as err:
        profile_bundle(bundle, runner="ssh", device=_device(sshd, device_python, sshd.closed_alias), **TIMING)
    assert "\n" not in str(err.value)


def test_auth_failure_is_named(sshd, device_python, bundle):  # noqa: F811
    with pytest.raises(DeviceError, match="authentication failed"):
        profile_bundle(bundle, runner="ssh", device=_device(sshd, device_python, user="nobody"), **TIMING)


def test_unknown_host_name_is_a_dns_error(sshd, device_python, bundle):  # noqa: F811
    with pytest.raises(DeviceError, match="DNS lookup failed"):
        profile_bundle(bundle, runner="ssh", device=_device(sshd, device_python, "no-such-device.invalid"), **TIMING)


def test_missing_python_and_missing_runtime_on_device(sshd, device_python, bundle, tmp_path):  # noqa: F811
    with pytest.raises(DeviceError, match="command not found on the device.*python3.99"):
        profile_bundle(bundle, runner="ssh", device=_device(sshd, Path("python3.99")), **TIMING)

    from sshd_fixture import make_minimal_venv

    numpy_only = make_minimal_venv(tmp_path / "numpy-only", ("numpy",))
    with pytest.raises(DeviceError, match="runtime 'onnxruntime' is not installed"):
        profile_bundle(bundle, runner="ssh", device=_device(sshd, numpy_only), **TIMING)


def test_remote_command_timeout_is_reported(sshd, device_python, bundle):  # noqa: F811
    device = _device(sshd, device_python, timeout_s=3)
    with pytest.raises(DeviceError, match=r"timed out after 3 s while profiling"):
        profile_bundle(bundle, runner="ssh", device=device, runs=10**9, min_seconds=5, max_seconds=5, warmup=0)


def test_facts_through_ssh(sshd, device_python):  # noqa: F811
    facts = SSHRunner().facts(_device(sshd, device_python))
    assert facts["python_executable"] == str(device_python)
    assert set(facts["runtimes"]) >= {"numpy", "onnxruntime", "ai-edge-litert"}
    assert facts["mem_available_mb"] > 0 and facts["cores"] >= 1


def _inventory(sshd: SSHServer, python: Path, tmp_path: Path) -> Path:  # noqa: F811
    path = tmp_path / "inventory.yaml"
    rows = [("edge", sshd.alias), ("edge-down", sshd.closed_alias)]
    path.write_text("devices:\n" + "".join(
        f"  - {{name: {n}, host: {h}, profile: host, ssh_config: {sshd.config}, retries: 0,\n"
        f"     workdir: {sshd.root}/remote, python: {python}}}\n" for n, h in rows))
    return path


def _run_dir(bundle_dir: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "runs" / "digits-host"
    shutil.copytree(bundle_dir, run / "bundle")
    return run


def test_cli_check_deploy_profile_and_profile_all(sshd, device_python, bundle, local_result, tmp_path):  # noqa: F811
    inv = _inventory(sshd, device_python, tmp_path)
    run = _run_dir(bundle, tmp_path)
    cli = CliRunner()

    checked = cli.invoke(devices, ["--inventory", str(inv), "check", "edge"])
    assert checked.exit_code == 0, checked.output
    assert "onnxruntime" in checked.output and "reachable" in checked.output

    deployed = cli.invoke(devices, ["--inventory", str(inv), "deploy", "edge", str(run)])
    assert deployed.exit_code == 0, deployed.output
    assert (sshd.root / "remote" / "bundles" / local_result["bundle_id"] / "agent.py").is_file()

    timing = ["--runs", "5", "--min-seconds", "0", "--warmup", "1"]
    profiled = cli.invoke(devices, ["--inventory", str(inv), "profile", "edge", str(run), *timing])
    assert profiled.exit_code == 0, profiled.output
    saved = json.loads((run / "profile" / "edge.json").read_text())
    assert saved["accuracy"] == local_result["accuracy"]

    both = cli.invoke(devices, ["--inventory", str(inv), "profile-all", str(run), *timing])
    # one device is down: reported in its column, the other still profiled, then a one-line error
    assert isinstance(both.exception, DeviceError) and "1 of 2 devices failed: edge-down" in str(both.exception)
    assert "connection refused" in both.output
    table = json.loads((run / "profile" / "all.json").read_text())
    assert table["edge"]["accuracy"]["top1"] == local_result["accuracy"]["top1"]
    assert "connection refused" in table["edge-down"]["error"]


def test_cli_check_unreachable_device_is_one_line(sshd, device_python, tmp_path):  # noqa: F811
    inv = _inventory(sshd, device_python, tmp_path)
    result = CliRunner().invoke(devices, ["--inventory", str(inv), "check", "edge-down"])
    assert isinstance(result.exception, DeviceError)
    assert "connection refused" in str(result.exception)
