"""The digits-mlp slice end to end: steps, manifests, cache, parity, budgets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from edgeopt.pipeline import Pipeline, Timing, budgets_for, verdict
from edgeopt.profiles import load_profile
from edgeopt.recipes import load_recipe

FAST = Timing(warmup=2, runs=5, min_seconds=0.05)


def _pipeline(root: Path, out: Path, recipe_path: Path | None = None) -> Pipeline:
    recipe = load_recipe(recipe_path or root / "targets" / "digits-mlp.yaml")
    return Pipeline(recipe, load_profile("x86-cpu"), out, timing=FAST, cache_dir=out.parent / "cache")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("run")
    steps = _pipeline(ROOT, out).run()
    return out, steps


def test_steps_and_manifests(first_run):
    out, steps = first_run
    assert [s.dir.name for s in steps] == ["00-original", "01-lowrank", "02-finetune", "03-export"]
    for step in steps:
        manifest = json.loads((step.dir / "manifest.json").read_text())
        assert manifest["input_hash"] and manifest["wall_s"] > 0
        assert Path(manifest["artifact"]["path"]).is_file()
        assert manifest["metrics"]["profile"]["latency_ms"]["p50"] > 0
    original, lowrank, finetuned, exported = (s.metrics for s in steps)
    assert original["accuracy"] >= 0.96  # the shipped checkpoint
    assert lowrank["params"] < 0.6 * original["params"]
    assert lowrank["pass"]["factorized_layers"]  # something was factorized
    assert exported["format"] == "onnx"
    assert exported["pass"]["parity"]["max_rel"] < 1e-4
    assert exported["pass"]["parity"]["top1_agreement"] == 1.0
    assert exported["accuracy"] == pytest.approx(finetuned["accuracy"], abs=1e-9)
    assert finetuned["accuracy"] > lowrank["accuracy"]
    assert 100 * (original["accuracy"] - exported["accuracy"]) <= 1.5
    assert (out / "bundle" / "meta.json").is_file()


def test_second_run_skips_every_step(first_run, root):
    out, steps = first_run
    again = _pipeline(root, out).run()
    assert all(s.cached for s in again)
    assert [s.metrics["accuracy"] for s in again] == [s.metrics["accuracy"] for s in steps]


def test_changed_config_reruns_from_that_step(first_run, root, tmp_path):
    out, _ = first_run
    recipe = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    recipe["passes"][0] = {"lowrank": {"rank_ratio": 0.6}}
    recipe["model"]["checkpoint"] = str(root / recipe["model"]["checkpoint"])
    path = tmp_path / "digits-mlp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    again = _pipeline(root, out, path).run()
    assert [s.cached for s in again] == [True, False, False, False]


def test_budget_verdict(first_run, root):
    _, steps = first_run
    recipe = load_recipe(root / "targets" / "digits-mlp.yaml")
    budgets = budgets_for(recipe, load_profile("x86-cpu"))
    assert budgets.max_model_size_mb == 1  # the recipe's override wins over the profile's 100
    checks = verdict(steps, budgets)
    assert checks["max_model_size_mb"]["ok"]
    strict = budgets.model_copy(update={"max_latency_ms": 1e-6})
    assert not verdict(steps, strict)["max_latency_ms"]["ok"]


def test_other_profile_reuses_profile_independent_steps(first_run, root):
    out, steps = first_run
    other = Pipeline(load_recipe(root / "targets" / "digits-mlp.yaml"), load_profile("jetson-orin-nano"),
                     out.parent / "other-profile", timing=FAST, cache_dir=out.parent / "cache")
    other_steps = other.run()
    # original, lowrank and finetune come from the shared step cache; export depends on the profile
    assert [s.cached for s in other_steps] == [True, True, True, False]
    assert other_steps[2].metrics["accuracy"] == steps[2].metrics["accuracy"]
    # but every step is measured again, with this profile's thread count (capped at this host's cores)
    assert all(s.metrics["profile"]["threads"] == min(6, os.cpu_count()) for s in other_steps)


def test_clearing_a_step_keeps_only_the_resume_checkpoint(tmp_path):
    from edgeopt.pipeline import RESUME_FILE, _clear_step_dir

    step = tmp_path / "02-distill"
    (step / "profiled").mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"half")
    (step / RESUME_FILE).write_bytes(b"state")
    _clear_step_dir(step)
    assert [p.name for p in step.iterdir()] == [RESUME_FILE]
    (step / RESUME_FILE).unlink()
    _clear_step_dir(step)
    assert not step.exists()


@pytest.mark.parametrize(("mode", "runtime"), [("static", "tensorrt"), ("dynamic", "onnxruntime")])
def test_jetson_bundle_is_built_by_tensorrt_when_it_can_take_the_model(root, tmp_path, mode, runtime):
    """A Jetson run's bundle carries the ONNX for the device to build an engine from; static int8
    is made symmetric so TensorRT takes it, dynamic int8 (integer-only ops) falls back to onnxruntime."""
    spec = yaml.safe_load((root / "targets" / "digits-mlp.yaml").read_text())
    spec["model"]["checkpoint"] = str(root / spec["model"]["checkpoint"])
    spec["passes"] = [{"quantize": {"format": "onnx", "mode": mode}}]
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(spec))
    Pipeline(load_recipe(recipe_path), load_profile("jetson-orin-nano"), tmp_path / "run", timing=FAST).run()
    meta = json.loads((tmp_path / "run" / "bundle" / "meta.json").read_text())
    assert meta["runtime"] == runtime and meta["model"] == "model.onnx"
    assert meta.get("precision") == ("int8" if runtime == "tensorrt" else None)
