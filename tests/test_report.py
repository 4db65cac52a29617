"""The report: built once from the steps, read by the terminal/markdown/HTML renderers; honest labels
(host vs device), spreads, negative drops, 80 columns, the task's metric name, bad report.json."""

from __future__ import annotations

import json
import os
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from edgeopt.cli import cli
from edgeopt.pipeline import StepResult
from edgeopt.profiles import load_profile
from edgeopt.report import build_report, load_devices, load_report, print_report, write_report
from edgeopt.report.cells import steps_table
from edgeopt.report.html import to_html
from edgeopt.report.markdown import to_markdown
from edgeopt.report.plots import figures, latency_scale

HOST_FACTS = {"arch": "x86_64", "hostname": "ci-box", "cpu_model": "Xeon", "os": "Linux", "python": "3.12"}


def _latency(p50: float, spread: float = 0.05, n: int = 200, seed: int = 0) -> dict:
    samples = np.random.default_rng(seed).normal(p50, spread * p50, n).clip(p50 * 0.5)
    return {"p10": float(np.percentile(samples, 10)), "p50": float(np.percentile(samples, 50)),
            "p90": float(np.percentile(samples, 90)), "p99": float(np.percentile(samples, 99)),
            "mean": float(samples.mean()), "samples": samples.round(6).tolist()}


def _steps(latencies: list[float], accuracies: list[float], runtime: str = "tflite", device: str = "localhost",
           metric: str | None = None) -> list[StepResult]:
    names = ["original", "lowrank", "finetune", "export"][: len(latencies)]
    steps = []
    for i, (name, p50, acc) in enumerate(zip(names, latencies, accuracies, strict=True)):
        metrics = {"format": "torch" if name != "export" else "tflite", "precision": "fp32", "size_mb": 0.2 / (1 + i),
                   "accuracy": acc, "runtime": runtime, "params": 50_000 // (1 + i), "pass": {},
                   "profile": {"latency_ms": _latency(p50, seed=i), "init_ms": 3.0, "peak_rss_mb": 80.0,
                               "runtime": runtime, "runtime_version": "2.3.0", "device": HOST_FACTS,
                               "target": {"runner": "local", "device": device}}}
        if metric:
            metrics["metric"] = metric
        steps.append(StepResult(i, name, Path(f"{i:02d}-{name}"), None, metrics, False, 1.0))
    return steps


CHECKS = {"max_latency_ms": {"measured": 9.0, "limit": 5.0, "ok": False},
          "max_accuracy_drop": {"measured": 1.11, "limit": 1.5, "ok": True},
          "max_peak_memory_mb": {"measured": 80.0, "limit": 1024.0, "ok": True}}


def test_host_run_of_a_board_profile_is_labelled_and_its_device_budgets_not_judged(tmp_path):
    report = build_report("digits-mlp", load_profile("rpi5"), _steps([1.0, 0.5, 0.5, 0.5], [0.976, 0.817, 0.965, 0.965]),
                          CHECKS)
    assert not report.measurement.on_device
    assert report.measurement.label == "measured on x86_64 host, not on the device"
    # a latency "miss" measured on the host says nothing about the Pi: not measured, not a failure
    assert report.budgets["max_latency_ms"].status == "not measured" and report.budgets["max_latency_ms"].ok is None
    assert report.budgets["max_peak_memory_mb"].status == "not measured"
    assert report.budgets["max_accuracy_drop"].status == "ok" and report.passed
    write_report(tmp_path, report)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["measurement"]["label"] == "measured on x86_64 host, not on the device"
    assert data["budgets"]["max_latency_ms"]["status"] == "not measured"
    assert "measured on x86_64 host, not on the device" in (tmp_path / "report.html").read_text()
    assert "not measured" in (tmp_path / "report.md").read_text()


def test_host_profile_on_its_own_host_judges_every_budget():
    report = build_report("digits-mlp", load_profile("x86-cpu"), _steps([1.0, 0.5], [0.976, 0.97], "onnxruntime"),
                          CHECKS)
    assert report.measurement.on_device and report.measurement.label == "measured on this x86_64 host"
    assert report.budgets["max_latency_ms"].status == "MISSED" and not report.passed


def test_device_run_judges_device_budgets():
    steps = _steps([1.0, 0.5], [0.976, 0.97], device="rpi5")
    report = build_report("digits-mlp", load_profile("rpi5"), steps, CHECKS)
    assert report.measurement.on_device and "device 'rpi5'" in report.measurement.label
    assert report.budgets["max_latency_ms"].status == "MISSED" and not report.passed


def test_jetson_bundle_timed_with_onnxruntime_says_so():
    report = build_report("digits-vmamba", load_profile("jetson-orin-nano"),
                          _steps([1.0, 0.5], [0.976, 0.97], "onnxruntime"), CHECKS)
    assert any("TensorRT" in note and "onnxruntime" in note for note in report.measurement.notes)
    assert "TensorRT" in to_markdown(report) and "TensorRT" in to_html(report)
    # a model TensorRT would refuse ships as an onnxruntime bundle: nothing to point out then
    fallback = build_report("digits-vmamba", load_profile("jetson-orin-nano"),
                            _steps([1.0, 0.5], [0.976, 0.97], "onnxruntime"), CHECKS, bundle_runtime="onnxruntime")
    assert not any("TensorRT" in note for note in fallback.measurement.notes)


def test_drop_is_negative_and_spread_and_noise_are_shown():
    # lowrank: 15.93 points lower; finetune within the noise of the original; export 2x faster
    report = build_report("digits-mlp", load_profile("x86-cpu"),
                          _steps([1.0, 1.01, 0.5, 0.5], [0.9759, 0.8166, 0.9648, 0.9648], "onnxruntime"), {})
    table = steps_table(report)
    rows = {row[0]: dict(zip(table.columns, row, strict=True)) for row in table.rows}
    assert rows["lowrank"]["Δ pts"] == "-15.93" and rows["original"]["Δ pts"] == "+0.00"
    assert report.steps[1].delta_points == pytest.approx(-15.93)
    assert report.steps[1].within_noise and not report.steps[3].within_noise
    assert rows["lowrank"]["speed up"].startswith("≈") and rows["export"]["speed up"] == "2.00×"
    low, high = rows["original"]["p10–p90 ms"].split("–")
    assert float(low) < float(rows["original"]["p50 ms"]) < float(high)
    md = to_markdown(report)
    assert "| lowrank | torch fp32 |" in md and "-15.93" in md and "≈: the latency difference" in md


def test_environment_is_recorded():
    report = build_report("digits-mlp", load_profile("x86-cpu"), _steps([1.0, 0.5], [0.97, 0.97]), {})
    env = report.environment
    assert env.host == "ci-box" and env.arch == "x86_64" and env.runtimes == {"tflite": "2.3.0"}
    assert env.edgeopt and "torch" in env.toolchain and env.date.endswith("UTC")
    assert "edgeopt " in to_html(report) and "ci-box" in to_markdown(report)


def test_metric_name_comes_from_the_step_metrics():
    report = build_report("det", load_profile("x86-cpu"), _steps([1.0, 0.5], [0.61, 0.60], metric="mAP50"), {})
    assert report.metric == "mAP50" and "mAP50 %" in steps_table(report).columns
    assert "top-1" not in " ".join(steps_table(report).columns)
    plain = build_report("cls", load_profile("x86-cpu"), _steps([1.0, 0.5], [0.9, 0.9]), {})
    assert "top-1 %" in steps_table(plain).columns


def test_latency_axis_turns_log_when_values_span_decades():
    assert latency_scale([0.006, 0.5]) == "log" and latency_scale([0.4, 0.6]) == "linear"
    wide = build_report("x", load_profile("x86-cpu"), _steps([10.0, 0.05], [0.9, 0.9]), {})
    narrow = build_report("x", load_profile("x86-cpu"), _steps([1.0, 0.8], [0.9, 0.9]), {})
    import matplotlib.pyplot as plt

    for report, scale in ((wide, "log"), (narrow, "linear")):
        figs = figures(report)
        assert figs["Latency distribution"].axes[0].get_yscale() == scale
        assert figs["Accuracy vs latency"].axes[0].get_xscale() == scale
        for fig in figs.values():
            plt.close(fig)


def _terminal(report, width: int = 80) -> str:
    console = Console(width=width, file=StringIO(), color_system=None, log_path=False)
    print_report(report, console)
    return console.file.getvalue()


def test_tables_fit_80_columns_with_whole_numbers():
    steps = _steps([1.234, 0.987, 0.5, 0.25], [0.9759, 0.8166, 0.9648, 0.9648])
    for s in steps:
        s.metrics["params"] = 1_234_567
    report = build_report("digits-vmamba-lowrank", load_profile("rpi5"), steps, CHECKS)
    text = _terminal(report)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    for cell in ("-15.93", "1,234,567", "not measured"):
        assert cell in text, text  # not folded across lines
    assert "measured on x86_64 host, not on the device" in text


def _report_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    write_report(run, build_report("digits-mlp", load_profile("rpi5"), _steps([1.0, 0.5], [0.97, 0.96]), CHECKS))
    return run


def _device_result(p50: float) -> dict:
    return {"runtime": "tflite", "runtime_version": "1.4.0", "latency_ms": _latency(p50), "peak_rss_mb": 60.0,
            "accuracy": {"top1": 0.96}, "device": {"arch": "aarch64"}}


def test_report_command_shows_devices_and_failures(cli_runner, tmp_path):
    run = _report_run(tmp_path)
    (run / "profile").mkdir()
    (run / "profile" / "pi.json").write_text(json.dumps(_device_result(2.5)))
    (run / "profile" / "all.json").write_text(json.dumps({"pi": _device_result(2.5),
                                                          "orin": {"error": "device 'orin': connection refused"}}))
    devices = {d.name: d for d in load_devices(run)}
    assert devices["orin"].error == "device 'orin': connection refused" and devices["pi"].latency_ms.p50 > 0
    shown = cli_runner.invoke(cli, ["report", str(run)])
    assert shown.exit_code == 0, shown.output
    assert "pi" in shown.output and "connection refused" in shown.output and "aarch64" in shown.output
    page = (run / "report.html").read_text()
    assert "connection refused" in page and "<td>pi</td>" in page
    assert "connection refused" in (run / "report.md").read_text()


def test_report_out_elsewhere(cli_runner, tmp_path):
    run = _report_run(tmp_path)
    shown = cli_runner.invoke(cli, ["report", str(run), "--out", str(tmp_path / "views")])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "views" / "report.html").is_file() and (tmp_path / "views" / "report.md").is_file()


def _assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("drop", ["steps", "recipe", "passed"])
def test_report_json_missing_keys_is_one_line(cli_runner, tmp_path, drop):
    run = _report_run(tmp_path)
    data = json.loads((run / "report.json").read_text())
    del data[drop]
    (run / "report.json").write_text(json.dumps(data))
    _assert_one_line_error(cli_runner.invoke(cli, ["report", str(run)]), f"not a complete edgeopt report ({drop}")


def test_report_json_step_missing_a_key_is_one_line(cli_runner, tmp_path):
    run = _report_run(tmp_path)
    data = json.loads((run / "report.json").read_text())
    del data["steps"][1]["latency_ms"]
    (run / "report.json").write_text(json.dumps(data))
    _assert_one_line_error(cli_runner.invoke(cli, ["report", str(run)]), "steps.1.latency_ms")


def test_report_to_unwritable_out_is_one_line_before_work(cli_runner, tmp_path):
    run = _report_run(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _assert_one_line_error(cli_runner.invoke(cli, ["report", str(run), "--out", str(blocker / "views")]),
                           "cannot write to")
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _assert_one_line_error(cli_runner.invoke(cli, ["report", str(run), "--out", str(locked)]), "cannot write to")
        assert not (locked / "report.html").exists()


def test_log_lines_carry_no_source_suffix():
    from edgeopt.console import make_console

    console = make_console()
    with console.capture() as captured:
        console.log("02-distill: running")
    assert "02-distill: running" in captured.get() and ".py:" not in captured.get()


def test_a_report_json_from_before_spreads_still_loads(tmp_path):
    """Older report.json: no measurement, no p10, budgets without a status."""
    samples = [1.0, 1.1, 1.2, 0.9, 1.05] * 4
    step = {"step": "00-original", "pass": "original", "format": "torch", "precision": "fp32", "runtime": "tflite",
            "params": 10, "size_mb": 0.2, "accuracy": 0.9, "accuracy_drop_points": 0.0, "speedup_vs_original": 1.0,
            "latency_ms": {"p50": 1.05, "p90": 1.2, "samples": samples}}
    (tmp_path / "report.json").write_text(json.dumps({
        "recipe": "r", "profile": "x86-cpu", "steps": [step], "passed": True,
        "budgets": {"max_latency_ms": {"measured": 1.05, "limit": 5, "ok": True}}}))
    report = load_report(tmp_path)
    assert report.steps[0].latency_ms.p10 == pytest.approx(float(np.percentile(samples, 10)))
    assert report.budgets["max_latency_ms"].status == "ok" and report.measurement is None
    assert "r on x86-cpu" in _terminal(report)


def test_console_width_follows_columns_in_a_pipe(monkeypatch):
    from edgeopt.console import make_console

    monkeypatch.setenv("COLUMNS", "80")
    assert make_console().width == 80
    monkeypatch.delenv("COLUMNS")
    assert make_console().width == 160  # a pipe or CI log: wide enough for every table


def test_too_long_names_fold_but_numbers_stay_whole():
    """The regress table: names longer than 80 columns allow fold; figures and verdicts never do."""
    from edgeopt.report.cells import Table
    from edgeopt.report.terminal import rich_table

    rows = [["digits-vmamba-lowrank", "jetson-orin-nano", "max_peak_memory_mb", "1234.5678", "2048.0000",
             "baseline (other ISA)", "REGRESSION"]]
    console = Console(width=80, file=StringIO(), color_system=None)
    console.print(rich_table(Table(["recipe", "profile", "metric", "measured", "limit", "source", "verdict"], rows,
                                   left=3), 80, styled=6))
    text = console.file.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    for cell in ("1234.5678", "2048.0000", "REGRESSION"):
        assert cell in text, text
