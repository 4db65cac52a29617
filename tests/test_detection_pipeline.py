"""A detector recipe end to end: lowrank + distill (detection loss) + ONNX export, scored by COCO mAP50
in-process and from the device agent's own decoded detections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from edgeopt.pipeline import Pipeline, Timing
from edgeopt.profiler.detections import bundle_targets
from edgeopt.profiles import load_profile
from edgeopt.recipes import load_recipe

TINY = dict(num_classes=3, img_size=64, depths=[1, 1, 1, 1], dims=[4, 8, 8, 8], neck_width=8, ssm_d_state=4,
            ssm_ratio=1.0, fusion_hidden=4)  # fmt: skip


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    recipe = {
        "name": "tiny-det",
        "model": {"name": "fusion-vmamba-det", "kwargs": TINY, "input_shape": [4, 64, 64]},
        "dataset": {"name": "rgbt-synthetic", "kwargs": {"size": 64, "n_train": 4, "n_calib": 4, "n_eval": 6,
                                                          "cache": False}},
        "passes": [{"lowrank": {"rank_ratio": 0.5, "ss2d_only": True, "calib_samples": 4}},
                   {"distill": {"steps": 2, "batch_size": 2, "eval_every": 1, "patience": 2}},
                   {"export": {"format": "onnx", "parity_samples": 4}}],
        "profiles": ["x86-cpu"],
    }  # fmt: skip
    path = tmp / "tiny-det.yaml"
    path.write_text(yaml.safe_dump(recipe))
    steps = Pipeline(load_recipe(path), load_profile("x86-cpu"), tmp / "run",
                     timing=Timing(warmup=1, runs=2, min_seconds=0.0)).run()  # fmt: skip
    return tmp / "run", steps


def test_every_step_is_scored_by_map50(detector_run):
    _, steps = detector_run
    assert [s.name for s in steps] == ["original", "lowrank", "distill", "export"]
    for step in steps:
        m = step.metrics
        assert m["metric"] == "mAP50" and set(m["scores"]) >= {"map50", "map50_95"}
        assert 0.0 <= m["accuracy"] == m["scores"]["map50"] <= 1.0
        device = m["profile"]["accuracy"]
        assert device["metric"] == "mAP50" and device["total"] == 6
    assert steps[2].metrics["pass"]["metric"] == "mAP50" and steps[2].metrics["pass"]["steps"] >= 1
    parity = steps[3].metrics["pass"]["parity"]
    assert parity["max_rel"] < 1e-4 and parity["top1_agreement"] == 1.0


def test_device_map_from_agent_detections_matches_the_in_process_map(detector_run):
    """The ONNX step: the pipeline decodes ORT outputs on the host; the agent decodes its own ORT
    outputs in the bundle (numpy yolo_decode) and the host scores them: the same mAP."""
    run_dir, steps = detector_run
    export_step = steps[-1]
    assert export_step.metrics["profile"]["accuracy"]["map50"] == pytest.approx(export_step.metrics["accuracy"],
                                                                                abs=1e-6)  # fmt: skip
    meta = json.loads((run_dir / "bundle" / "meta.json").read_text())
    assert meta["postprocess"]["kind"] == "yolo" and (run_dir / "bundle" / "yolo_decode.py").is_file()
    targets = bundle_targets(run_dir / "bundle")
    assert len(targets) == 6 and all(b.shape[1] == 4 and len(b) == len(lab) for b, lab in targets)
    assert sum(len(lab) for _, lab in targets) > 0 and all(np.all(lab < 3) for _, lab in targets)


def test_detector_recipes_load_and_target_the_pi():
    from tests.conftest import ROOT

    for path in sorted((ROOT / "targets" / "detection").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.model.name == "rgbt-vmamba-det" and recipe.profiles == ["rpi5"]
        assert recipe.dataset.name == "rgbt-synthetic"
