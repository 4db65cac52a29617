"""`edgeopt sweep`: rank-ratio table, JSON and Pareto plot on a tiny trained VMamba recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from lowrank_fixtures import TINY, trained_teacher

from edgeopt.errors import InputError
from edgeopt.sweep import pareto_front, parse_ratios, sweep


def test_pareto_front_keeps_only_undominated_points():
    points = [(5.0, 90.0), (3.0, 85.0), (4.0, 84.0), (3.0, 80.0), (6.0, 89.0), (2.0, 70.0)]
    assert pareto_front(points) == [(2.0, 70.0), (3.0, 85.0), (5.0, 90.0)]


def test_ratios_are_validated():
    assert parse_ratios("0.65,0.6, 0.5") == [0.65, 0.6, 0.5]
    for bad in ("0.5,x", "1.5", ""):
        with pytest.raises(InputError, match="--rank-ratios"):
            parse_ratios(bad)


def test_sweep_command_prints_the_table_and_writes_the_plot(tmp_path: Path):
    recipe = {
        "name": "tiny-vmamba",
        "model": {"name": "vmamba", "kwargs": TINY, "checkpoint": str(trained_teacher().path), "input_shape": [1, 16, 16]},
        "dataset": {"name": "digits", "kwargs": {"size": 16}},
        "passes": [{"lowrank": {"rank_ratio": 0.5, "ss2d_only": True}},
                   {"distill": {"steps": 4, "batch_size": 16, "eval_every": 2, "state_steps": 4}}, "export"],
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    result = CliRunner().invoke(sweep, [str(path), "--rank-ratios", "0.6,0.3", "--out", str(out), "--steps", "3"],
                                terminal_width=200)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "ratio 0.60" in result.output and "ratio 0.30" in result.output and "top-1 distilled" in result.output
    )
    written = json.loads((out / "sweep.json").read_text())
    rows = written["rows"]
    assert written["runtime"] == "ONNX Runtime" and "latency: ONNX Runtime" in result.output  # x86-cpu's runtime
    assert [r["name"] for r in rows] == ["teacher", "ratio 0.60", "ratio 0.30"]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"]
    assert all(r["latency_ms"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["distill"]["steps"] <= 3 for r in rows[1:])
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    bad = CliRunner().invoke(sweep, [str(path), "--rank-ratios", "2"])  # the CLI group turns this into exit 2
    assert isinstance(bad.exception, InputError)


def test_sweep_times_in_the_profiles_runtime(tmp_path: Path):
    """--profile rpi5 times the models in LiteRT, the runtime `format: auto` deploys there."""
    recipe = {
        "name": "tiny-vmamba",
        "model": {"name": "vmamba", "kwargs": TINY, "checkpoint": str(trained_teacher().path), "input_shape": [1, 16, 16]},
        "dataset": {"name": "digits", "kwargs": {"size": 16}},
        "passes": [{"lowrank": {"rank_ratio": 0.5, "ss2d_only": True}},
                   {"distill": {"steps": 2, "batch_size": 16, "eval_every": 2, "state_steps": 4}}],
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    result = CliRunner().invoke(sweep, [str(path), "--rank-ratios", "0.3", "--profile", "rpi5", "--out", str(out)],
                                terminal_width=200)  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads((out / "sweep.json").read_text())
    assert written["runtime"] == "LiteRT" and "latency: LiteRT" in result.output
    assert (out / "teacher.tflite").is_file() and (out / "ratio-0.30" / "student.tflite").is_file()
    assert all(r["latency_ms"] > 0 for r in written["rows"])
