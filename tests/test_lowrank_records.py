"""`rank_ratio` rounding, and the `lowrank` edit naming the kept state modes so that replay and
distillation never recompute them."""

from __future__ import annotations

from pathlib import Path

import torch
from lowrank_fixtures import INPUT_SHAPE, TINY, digits16, tiny_vmamba

import edgeopt.lowrank.plan as plan
from edgeopt.artifact import TORCH, ModelArtifact, ModelSource, build_structure, save_weights
from edgeopt.lowrank.factors import rank_for_ratio
from edgeopt.lowrank.modules import STATE
from edgeopt.passes import PassContext, make_pass
from edgeopt.profiles import load_profile


def test_rank_ratio_floors_exactly_and_one_means_no_factorization():
    assert int(0.57 * 200 * 200 / 400) == 56  # what flooring the float product gave
    assert rank_for_ratio(200, 200, 0.57) == 57
    assert rank_for_ratio(64, 64, 0.5) == 16 and rank_for_ratio(256, 128, 0.5) == 42
    assert rank_for_ratio(64, 64, 1.0) == 64 and rank_for_ratio(256, 128, 1.0) == 128
    assert rank_for_ratio(64, 64, 0.001) == 1


def test_rank_ratio_one_leaves_the_model_alone(tmp_path):
    model = tiny_vmamba()
    save_weights(model, tmp_path / "t.safetensors")
    teacher = ModelArtifact(TORCH, tmp_path / "t.safetensors", ModelSource("vmamba", TINY), INPUT_SHAPE, module=model)
    ctx = PassContext(digits16(), load_profile("x86-cpu"), tmp_path / "lowrank", [teacher])
    ctx.step_dir.mkdir()
    out = make_pass("lowrank", {"rank_ratio": 1.0}).run(teacher, ctx)
    assert ctx.metrics["factorized_layers"] == {} and out.edits == []


def test_edit_records_the_kept_state_modes_and_nothing_recomputes_them(tmp_path: Path, monkeypatch):
    model = tiny_vmamba()
    save_weights(model, tmp_path / "t.safetensors")
    teacher = ModelArtifact(TORCH, tmp_path / "t.safetensors", ModelSource("vmamba", TINY), INPUT_SHAPE, module=model)
    splits = digits16()
    ctx = PassContext(splits, load_profile("x86-cpu"), tmp_path / "lowrank", [teacher])
    ctx.step_dir.mkdir()
    student = make_pass("lowrank", {"rank_ratio": 0.5, "ss2d_only": True}).run(teacher, ctx)
    edit = student.edits[-1]
    states = {k: v for k, v in edit["ranks"].items() if k.endswith(f".{STATE}")}
    assert states and set(edit["state_modes"]) == set(states)
    for name, modes in edit["state_modes"].items():
        assert len(modes) == states[name] and len(set(modes)) == len(modes)
        block = student.load_module().get_submodule(name.rpartition(".")[0])
        assert block.kept_modes.tolist() == sorted(modes)

    def no_energies(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("state energies recomputed")

    monkeypatch.setattr(plan, "state_energies", no_energies)
    replayed = build_structure(student.source, student.edits)  # replay names the same modes
    for name, modes in edit["state_modes"].items():
        assert replayed.get_submodule(name.rpartition(".")[0]).kept_modes.tolist() == sorted(modes)
    dctx = PassContext(splits, load_profile("x86-cpu"), tmp_path / "distill", [teacher, student])
    dctx.step_dir.mkdir()
    distilled = make_pass("distill", {"steps": 2, "batch_size": 8, "eval_every": 1, "state_steps": 2}).run(student, dctx)
    assert dctx.metrics["steps"] >= 1
    assert torch.isfinite(torch.tensor(dctx.metrics["calib_accuracy"])) and distilled.edits == student.edits
