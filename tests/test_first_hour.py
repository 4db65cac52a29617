"""A new user's first hour: bad inputs end in one line and exit 2 with nothing half-written;
the step cache heals itself; a second run on the same --out refuses; Ctrl-C exits 130."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgeopt.cli import cli
from edgeopt.fileio import exclusive
from edgeopt.pipeline import Pipeline, Timing
from edgeopt.profiles import load_profile
from edgeopt.recipes import load_recipe
from edgeopt.stepcache import StepCache

FAST = ["--runs", "3", "--min-seconds", "0", "--warmup", "1"]
FAST_TIMING = Timing(warmup=1, runs=3, min_seconds=0)


def _recipe(root: Path, tmp_path: Path, name: str = "recipe.yaml", **changes) -> Path:
    data = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    data["model"]["checkpoint"] = str(root / data["model"]["checkpoint"])
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(result, pattern: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output and "make_bundle" not in result.output
    assert pattern in lines[0], lines[0]
    return lines[0]


# -- wrong input_shape -----------------------------------------------------------------------
def test_wrong_input_shape_is_named_before_export(cli_runner, root, tmp_path):
    data = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    model = {**data["model"], "checkpoint": str(root / data["model"]["checkpoint"]), "input_shape": [32]}
    recipe = _recipe(root, tmp_path, model=model)
    out = tmp_path / "run"
    result = cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu", "--out", str(out), *FAST])
    line = _one_line_error(result, "model.input_shape [32]")
    assert "2x32 and 64x256" in line  # the mismatch itself, not an "unsupported op"
    assert not (out / "00-original").exists() and not (out / "report.json").exists()
    exported = cli_runner.invoke(cli, ["export", str(recipe), "--out", str(tmp_path / "m.onnx")])
    _one_line_error(exported, "model.input_shape [32]")
    assert not (tmp_path / "m.onnx").exists()


# -- unwritable --out --------------------------------------------------------------------------
def test_unwritable_out_is_refused_before_the_work(cli_runner, root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    recipe = _recipe(root, tmp_path)
    optimized = cli_runner.invoke(cli, ["optimize", str(recipe), "--profile", "x86-cpu", "--out", str(blocker / "run")])
    _one_line_error(optimized, "cannot write to")
    exported = cli_runner.invoke(cli, ["export", str(recipe), "--out", str(blocker / "m.onnx")])
    _one_line_error(exported, "cannot write to")


def test_read_only_out_directory(cli_runner, root, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    exported = cli_runner.invoke(cli, ["export", str(_recipe(root, tmp_path)), "--out", str(out / "m.onnx")])
    _one_line_error(exported, "cannot write to")


# -- two runs on one --out -----------------------------------------------------------------------
def test_second_run_on_the_same_out_refuses(cli_runner, root, tmp_path):
    out = tmp_path / "run"
    with exclusive(out):  # another run holds the directory
        result = cli_runner.invoke(cli, ["optimize", str(_recipe(root, tmp_path)), "--profile", "x86-cpu",
                                         "--out", str(out), *FAST])  # fmt: skip
    _one_line_error(result, "in use by another edgeopt run")
    assert [p.name for p in out.iterdir()] == [".edgeopt.lock"]  # no step, no temp file


# -- Ctrl-C --------------------------------------------------------------------------------------
def test_interrupt_exits_130(cli_runner, root, tmp_path, monkeypatch):
    import edgeopt.recipes

    def interrupted(path):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(edgeopt.recipes, "load_recipe", interrupted)
    result = cli_runner.invoke(cli, ["optimize", str(_recipe(root, tmp_path)), "--profile", "x86-cpu"])
    assert result.exit_code == 130 and "interrupted" in result.stderr


# -- a damaged step cache heals itself -------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    from tests.conftest import ROOT

    base = tmp_path_factory.mktemp("cache-run")
    recipe = load_recipe(_recipe(ROOT, base, passes=[{"lowrank": {"rank_ratio": 0.5}}]))
    cache = base / "cache"
    steps = Pipeline(recipe, load_profile("x86-cpu"), base / "first", timing=FAST_TIMING, cache_dir=cache).run()
    return recipe, cache, steps


def _rerun(recipe, cache: Path, out: Path) -> tuple[list, list[str]]:
    said: list[str] = []
    pipeline = Pipeline(recipe, load_profile("x86-cpu"), out, timing=FAST_TIMING, cache_dir=cache)
    pipeline.notify = said.append
    return pipeline.run(), said


@pytest.mark.parametrize("damage", ["truncated weights", "bad entry.json"])
def test_damaged_cache_entry_is_evicted_and_recomputed(cached_run, tmp_path, damage):
    recipe, cache, steps = cached_run
    entry = cache / steps[1].metrics["key"]
    if damage == "truncated weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (entry / "entry.json").write_text("{half")
    again, said = _rerun(recipe, cache, tmp_path / "run")
    assert any("damaged" in line and "recomputing" in line for line in said), said
    assert again[1].cached is False  # recomputed, not loaded from the broken entry
    assert again[1].metrics["accuracy"] == steps[1].metrics["accuracy"]
    assert StepCache(cache).fetch(steps[1].metrics["key"], tmp_path / "probe") is not None  # stored afresh


def test_damaged_step_in_the_run_directory_is_redone(cached_run, tmp_path):
    recipe, cache, steps = cached_run
    out = tmp_path / "run"
    _rerun(recipe, cache, out)
    weights = out / "01-lowrank" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "00-original" / "manifest.json").write_text("not json")
    again, _ = _rerun(recipe, cache, out)
    assert [s.metrics["accuracy"] for s in again] == [s.metrics["accuracy"] for s in steps]
    assert len(weights.read_bytes()) > 100


def test_cache_info_and_clear(cli_runner, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "0123abcd" ).mkdir(parents=True)
    (cache / "0123abcd" / "model.safetensors").write_bytes(b"x" * 2048)
    (cache / ".0123abcd.tmp").mkdir()  # an interrupted store
    monkeypatch.setenv("EDGEOPT_CACHE_DIR", str(cache))
    info = cli_runner.invoke(cli, ["cache", "info"])
    assert info.exit_code == 0 and str(cache) in info.output and "entries: 1" in info.output
    cleared = cli_runner.invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output
    assert list(cache.iterdir()) == []


def test_default_cache_location(monkeypatch, tmp_path):
    from edgeopt.stepcache import default_cache_dir

    monkeypatch.delenv("EDGEOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "edgeopt" / "steps"
    monkeypatch.setenv("EDGEOPT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


# -- passes list ---------------------------------------------------------------------------------
def test_passes_list_shows_help_not_pydantic_internals(cli_runner):
    listed = cli_runner.invoke(cli, ["passes", "list"])
    assert listed.exit_code == 0
    assert "PydanticUndefined" not in listed.output
    assert "share of squared singular values kept" in listed.output  # lowrank's energy help
    assert json.dumps(0.5) in listed.output


# -- distill and sweep on a model without SS2D blocks; the sweep resumes ---------------------------
def _mlp_distill_recipe(root: Path, tmp_path: Path) -> Path:
    return _recipe(root, tmp_path, name="mlp-distill.yaml", passes=[
        {"lowrank": {"rank_ratio": 0.5}}, {"distill": {"steps": 6, "batch_size": 32, "eval_every": 3}}])


def test_distill_works_on_a_model_without_ss2d(root, tmp_path):
    recipe = load_recipe(_mlp_distill_recipe(root, tmp_path))
    steps = Pipeline(recipe, load_profile("x86-cpu"), tmp_path / "run", timing=FAST_TIMING,
                     cache_dir=tmp_path / "cache").run()  # fmt: skip
    distill = steps[2].metrics["pass"]
    assert distill["steps"] >= 3 and distill["calib_accuracy"] > 0.5
    assert steps[2].metrics["accuracy"] >= steps[1].metrics["accuracy"] - 0.02


def test_sweep_on_an_mlp_writes_rows_as_it_goes_and_resumes(cli_runner, root, tmp_path, monkeypatch):
    import edgeopt.sweep

    recipe, out = _mlp_distill_recipe(root, tmp_path), tmp_path / "sweep"
    args = ["sweep", str(recipe), "--rank-ratios", "0.5,0.3", "--steps", "3", "--out", str(out)]
    real_make_pass, made = edgeopt.sweep.make_pass, []

    def failing_second_distill(name, options):  # noqa: ANN001, ANN202
        made.append(name)
        if made.count("distill") == 2:
            raise KeyboardInterrupt  # a timeout during the last ratio
        return real_make_pass(name, options)

    monkeypatch.setattr(edgeopt.sweep, "make_pass", failing_second_distill)
    assert cli_runner.invoke(cli, args).exit_code == 130
    partial = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["name"] for r in partial] == ["teacher", "ratio 0.50"] and partial[1]["latency_ms"] is None
    monkeypatch.setattr(edgeopt.sweep, "make_pass", real_make_pass)
    resumed = cli_runner.invoke(cli, args, terminal_width=200)
    assert resumed.exit_code == 0, resumed.output
    assert "ratio 0.50: finished by an earlier run" in resumed.output
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["teacher", "ratio 0.50", "ratio 0.30"]
    assert rows[1]["accuracy"] == partial[1]["accuracy"] and all(r["latency_ms"] > 0 for r in rows)
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]


def test_errors_name_no_internal_function(cli_runner, tmp_path):
    result = cli_runner.invoke(cli, ["profile", str(tmp_path)])
    line = _one_line_error(result, "is not a profiler bundle")
    assert "edgeopt optimize" in line


def test_sweep_into_an_unwritable_out(cli_runner, root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe = _mlp_distill_recipe(root, tmp_path)
    _one_line_error(cli_runner.invoke(cli, ["sweep", str(recipe), "--out", str(blocker / "s")]), "cannot write to")


def test_third_party_banners_stay_out_of_the_output_unless_debug():
    """Importing litert-torch prints TensorFlow's absl banners (C++, straight to fd 2), torchao's
    missing-kernel warnings and torch's pytree notices; the CLI hides them, `--debug` shows them."""
    import os
    import subprocess
    import sys

    code = ("from edgeopt.console import third_party_quiet\nwith third_party_quiet():\n"
            "    import litert_torch\nprint('imported')")  # fmt: skip
    runs = {flag: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "EDGEOPT_DEBUG": flag}) for flag in ("", "1")}  # fmt: skip
    assert runs[""].returncode == 0 and runs[""].stdout == "imported\n" and runs[""].stderr == ""
    assert runs["1"].returncode == 0 and runs["1"].stderr.strip(), "nothing to hide: the test no longer tests"
