"""The per-profile regression check passes on committed figures and fails on a stricter baseline."""

from __future__ import annotations

import json
import shutil

from edgeopt.cli import cli

FAST = ["--runs", "10", "--min-seconds", "0.1", "--profile", "x86-cpu"]


def test_regress_update_pass_then_fail_on_stricter_baseline(cli_runner, root, tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    shutil.copy(root / "targets" / "digits-mlp.yaml", targets)
    (targets / "checkpoints").mkdir()
    shutil.copy(root / "targets" / "checkpoints" / "digits-mlp.safetensors", targets / "checkpoints")
    baselines = tmp_path / "baselines.json"
    common = ["regress", "--targets", str(targets), "--baselines", str(baselines), "--out", str(tmp_path / "runs"), *FAST]

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
