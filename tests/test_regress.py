"""The per-profile regression check passes on committed figures and fails on a stricter baseline."""

from __future__ import annotations

import json
import shutil

from edgeopt.cli import cli

FAST = ["--runs", "10", "--min-seconds", "0.1", "--profile", "x86-cpu"]


def _digits_mlp_only(root, tmp_path) -> tuple[list[str], object]:
    """A targets directory holding only digits-mlp: the regress arguments and the baselines path."""
    targets = tmp_path / "targets"
    (targets / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "targets" / "digits-mlp.yaml", targets)
    shutil.copy(root / "targets" / "checkpoints" / "digits-mlp.safetensors", targets / "checkpoints")
    baselines = tmp_path / "baselines.json"
    return ["regress", "--targets", str(targets), "--baselines", str(baselines), "--out", str(tmp_path / "runs"), *FAST], baselines


def test_regress_update_pass_then_fail_on_stricter_baseline(cli_runner, root, tmp_path):
    common, baselines = _digits_mlp_only(root, tmp_path)

    updated = cli_runner.invoke(cli, [*common, "--update"])
    assert updated.exit_code == 0, updated.output
    figures = json.loads(baselines.read_text())["digits-mlp@x86-cpu"]
    assert figures["accuracy"] > 95 and figures["size_mb"] < 1

    passed = cli_runner.invoke(cli, common)
    assert passed.exit_code == 0, passed.output
    assert "no regression" in passed.output

    stricter = dict(figures, accuracy=figures["accuracy"] + 2.0)
    baselines.write_text(json.dumps({"digits-mlp@x86-cpu": stricter}))
    failed = cli_runner.invoke(cli, common)
    assert failed.exit_code == 1, failed.output
    assert "digits-mlp@x86-cpu accuracy" in failed.output


def test_compare_flags_only_the_regressed_metric():
    from edgeopt.profiles import load_profile
    from edgeopt.regress import compare

    checks = compare("r", load_profile("x86-cpu"), {"accuracy": 97.0, "size_mb": 1.0, "latency_ratio": 1.0},
                     {"accuracy": 97.0, "size_mb": 0.5, "latency_ratio": 1.0}, {})
    assert [c.metric for c in checks if not c.ok] == ["size_mb"]


def test_latency_regression_is_retimed_and_kept_when_real(cli_runner, root, tmp_path):
    """A ratio over its limit is re-timed alternately; a 100x-stricter baseline still fails."""
    common, baselines = _digits_mlp_only(root, tmp_path)
    assert cli_runner.invoke(cli, [*common, "--update"]).exit_code == 0
    written = json.loads(baselines.read_text())
    from edgeopt.regress import HOST_KEY, host_isa

    assert written[HOST_KEY] == host_isa()
    figures = written["digits-mlp@x86-cpu"]
    assert 0.2 < figures["latency_ratio"] < 5  # a low-rank MLP is neither 5x faster nor 5x slower
    written["digits-mlp@x86-cpu"] = dict(figures, latency_ratio=figures["latency_ratio"] / 100)
    baselines.write_text(json.dumps(written))
    failed = cli_runner.invoke(cli, common)
    assert failed.exit_code == 1, failed.output
    assert "timing the original and final bundles alternately" in failed.output
    assert "digits-mlp@x86-cpu latency_ratio" in failed.output


def test_other_isa_widens_only_the_latency_tolerance():
    from edgeopt.profiles import load_profile
    from edgeopt.regress import compare

    baseline = {"accuracy": 97.0, "size_mb": 0.5, "latency_ratio": 1.0}
    measured = {"accuracy": 97.0, "size_mb": 0.5, "latency_ratio": 1.8}
    same = compare("r", load_profile("x86-cpu"), measured, baseline, {}, same_isa=True)
    other = compare("r", load_profile("x86-cpu"), measured, baseline, {}, same_isa=False)
    assert [c.metric for c in same if not c.ok] == ["latency_ratio"]
    assert all(c.ok for c in other) and {c.source for c in other} == {"baseline (other ISA)"}
    assert not compare("r", load_profile("x86-cpu"), dict(measured, latency_ratio=2.5), baseline, {}, same_isa=False)[2].ok


def test_host_isa_names_the_architecture():
    import platform

    from edgeopt.regress import host_isa

    assert host_isa().split()[0] == platform.machine()


def test_partial_update_refuses_baselines_from_another_isa(cli_runner, root, tmp_path):
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"_host": "riscv64 imaginary", "digits-mlp@x86-cpu": {}}))
    result = cli_runner.invoke(cli, ["regress", "--targets", str(root / "targets"), "--baselines", str(baselines),
                                     "--out", str(tmp_path / "runs"), "--update", *FAST])
    assert result.exit_code == 2
    assert "re-take every baseline" in result.output
    assert json.loads(baselines.read_text())["_host"] == "riscv64 imaginary"  # untouched
