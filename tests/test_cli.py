"""The CLI end to end, and every bad-input case: one line, exit 2, nothing half-written."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import yaml

from edgeopt.cli import cli

FAST = ["--runs", "5", "--min-seconds", "0.05", "--warmup", "2"]


def _recipe(root: Path, tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    data["model"]["checkpoint"] = str(root / data["model"]["checkpoint"])
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_optimize_end_to_end(cli_runner, root, tmp_path):
    out = tmp_path / "run"
    result = cli_runner.invoke(cli, ["optimize", str(root / "targets/digits-mlp.yaml"), "--profile", "x86-cpu", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    for column in ("params", "size MB", "top-1 %", "p50", "p10–p90"):
        assert column in result.output
    assert "cli.py:" not in result.output  # log lines carry no source suffix
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and [r["pass"] for r in report["steps"]] == ["original", "lowrank", "finetune", "export"]
    assert "| export | onnx fp32 |" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>export</td>" in page
    expected = "measured on this x86_64 host" if platform.machine() == "x86_64" else "not on the device"
    assert expected in page
    on_host = cli_runner.invoke(cli, ["devices", "profile", "host", str(out), *FAST])
    assert on_host.exit_code == 0, on_host.output
    shown = cli_runner.invoke(cli, ["report", str(out)])
    assert shown.exit_code == 0 and "export" in shown.output and "final bundle on devices" in shown.output
    assert "report.html" in shown.output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>host</td>" in page
    profiled = cli_runner.invoke(cli, ["profile", str(out / "bundle"), "--json", *FAST])
    assert profiled.exit_code == 0, profiled.output
    assert json.loads(profiled.output)["accuracy"]["top1"] == pytest.approx(report["steps"][-1]["accuracy"])


def test_missed_budget_exits_1(cli_runner, root, tmp_path):
    recipe = _recipe(root, tmp_path, budgets={"x86-cpu": {"max_latency_ms": 1e-6}})
    result = cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu", "--out", str(tmp_path / "r"), *FAST])
    assert result.exit_code == 1
    assert "max_latency_ms" in result.output


def test_export_command(cli_runner, root, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli_runner.invoke(cli, ["export", str(root / "targets/digits-mlp.yaml"), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "top-1 agreement 1.000" in result.output


def _assert_input_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    assert pattern in lines[0], lines[0]


def test_missing_recipe(cli_runner, tmp_path):
    result = cli_runner.invoke(cli, ["optimize", str(tmp_path / "nope.yaml"), "--profile", "x86-cpu"])
    _assert_input_error(result, "file not found")


def test_malformed_recipe(cli_runner, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\npasses: [lowrank\n")
    _assert_input_error(cli_runner.invoke(cli, ["optimize", str(path), "--profile", "x86-cpu"]), "malformed YAML")


def test_unknown_profile(cli_runner, root):
    result = cli_runner.invoke(cli, ["optimize", str(root / "targets/digits-mlp.yaml"), "--profile", "rpi-5"])
    _assert_input_error(result, "did you mean 'rpi5'")


def test_unknown_pass(cli_runner, root, tmp_path):
    recipe = _recipe(root, tmp_path, passes=[{"lowrnk": {}}])
    result = cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu", "--out", str(tmp_path / "r")])
    _assert_input_error(result, "did you mean 'lowrank'")


def test_checkpoint_that_does_not_fit(cli_runner, root, tmp_path):
    data = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    data["model"]["checkpoint"] = str(root / data["model"]["checkpoint"])
    data["model"]["kwargs"]["hidden"] = [128, 128]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "r"
    result = cli_runner.invoke(cli, ["optimize", str(path), "--profile", "x86-cpu", "--out", str(out)])
    _assert_input_error(result, "does not fit the model")
    assert not (out / "00-original").exists()  # nothing half-written


def test_missing_checkpoint(cli_runner, root, tmp_path):
    data = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    data["model"]["checkpoint"] = str(tmp_path / "missing.safetensors")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    result = cli_runner.invoke(cli, ["optimize", str(path), "--profile", "x86-cpu", "--out", str(tmp_path / "r")])
    _assert_input_error(result, "checkpoint not found")


def test_help_everywhere(cli_runner):
    for args in (["--help"], ["optimize", "--help"], ["export", "--help"], ["profile", "--help"], ["report", "--help"],
                 ["profiles", "list", "--help"], ["passes", "list", "--help"]):
        result = cli_runner.invoke(cli, args)
        assert result.exit_code == 0 and "Usage:" in result.output


def test_profiles_and_passes_listing(cli_runner):
    shown = cli_runner.invoke(cli, ["profiles", "show", "rpi5"])
    assert shown.exit_code == 0 and "Cortex-A76" in shown.output
    listed = cli_runner.invoke(cli, ["passes", "list"])
    assert listed.exit_code == 0 and "lowrank" in listed.output and "export" in listed.output


def test_recipe_name_cannot_escape_the_runs_directory(cli_runner, root, tmp_path):
    recipe = _recipe(root, tmp_path, name="../../escape")
    _assert_input_error(cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu"]), "field 'name'")


def test_budget_for_unknown_profile_is_rejected(cli_runner, root, tmp_path):
    recipe = _recipe(root, tmp_path, budgets={"rpi-5": {"max_latency_ms": 1}})
    _assert_input_error(cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu"]), "did you mean 'rpi5'")


def test_bad_dataset_arguments(cli_runner, root, tmp_path):
    recipe = _recipe(root, tmp_path, dataset={"name": "digits", "kwargs": {"sise": 8}})
    result = cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu", "--out", str(tmp_path / "r")])
    _assert_input_error(result, "dataset 'digits' rejected its arguments")


def test_malformed_report_json(cli_runner, tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    _assert_input_error(cli_runner.invoke(cli, ["report", str(tmp_path)]), "malformed JSON")


def test_regress_unknown_profile(cli_runner, root):
    result = cli_runner.invoke(cli, ["regress", "--targets", str(root / "targets"), "--profile", "rpi6"])
    _assert_input_error(result, "rpi6 unknown or not runnable")


@pytest.mark.parametrize("args", [["profile", "m.onnx", "--runs", "0"], ["profile", "m.onnx", "--warmup", "-1"],
                                  ["optimize", "r.yaml", "--profile", "x86-cpu", "--min-seconds", "-1"],
                                  ["devices", "profile", "b", "--threads", "0"]])
def test_timing_options_are_range_checked(cli_runner, args):
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 2
    assert "is not in the range" in result.output
