"""`edgeopt profile model.onnx|model.tflite` without --recipe: latency, memory and init time
from random inputs of the model's own shape; accuracy only with a recipe."""

from __future__ import annotations

import json

import pytest
from profiler_fixtures import digits_model, write_tflite  # noqa: F401  (fixture)

from edgeopt.cli import cli

FAST = ["--runs", "5", "--min-seconds", "0.05", "--warmup", "1"]


def _profiled(cli_runner, path, *extra) -> dict:
    result = cli_runner.invoke(cli, ["profile", str(path), "--json", *FAST, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_bare_onnx_without_recipe(cli_runner, digits_model, root):  # noqa: F811
    result = _profiled(cli_runner, digits_model.onnx_path)
    assert result["accuracy"] is None
    lat = result["latency_ms"]
    assert 0 < lat["p10"] <= lat["p50"] <= lat["p90"] and result["init_ms"] > 0 and result["peak_rss_mb"] > 0
    assert result["runs"] >= 5 and result["batch_size"] == 1
    shown = cli_runner.invoke(cli, ["profile", str(digits_model.onnx_path), *FAST])
    assert shown.exit_code == 0 and "give --recipe for accuracy" in shown.output and "measured on this" in shown.output
    # with a recipe the same file gets its accuracy on the recipe's eval split
    recipe = root / "targets" / "digits-mlp.yaml"
    with_accuracy = _profiled(cli_runner, digits_model.onnx_path, "--recipe", str(recipe))
    assert with_accuracy["accuracy"]["top1"] == pytest.approx(digits_model.numpy_top1, abs=1 / 540)


def test_bare_tflite_with_a_fixed_batch(cli_runner, digits_model, tmp_path):  # noqa: F811
    path = write_tflite(digits_model.weight, digits_model.bias, tmp_path / "digits.tflite")
    result = _profiled(cli_runner, path, "--profile", "rpi5")
    assert result["accuracy"] is None and result["runtime"] == "tflite" and result["latency_ms"]["p50"] > 0
    shown = cli_runner.invoke(cli, ["profile", str(path), "--profile", "rpi5", *FAST])
    assert "not on the device" in shown.output


def test_unreadable_model_file_is_one_line(cli_runner, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00not a model")
    result = cli_runner.invoke(cli, ["profile", str(bad), *FAST])
    assert result.exit_code == 2 and "not a readable ONNX model" in result.stderr, result.output
