"""Structure-aware distillation: loss terms, teacher lookup, early stop, resume, and a real accuracy gain."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lowrank_fixtures import digits16, tiny_vmamba, trained_teacher

import edgeopt.lowrank.distill as distill_module
from edgeopt.errors import InputError
from edgeopt.evaluate import top1_accuracy, torch_outputs
from edgeopt.lowrank.distill import DistillSettings, distill, kept_modes
from edgeopt.lowrank.losses import (
    capture_ss2d,
    feature_loss,
    logit_kl,
    state_loss,
    state_projections,
    svd_loss,
)
from edgeopt.lowrank.plan import factor_pairs, teacher_factors
from edgeopt.passes import PassContext, make_pass
from edgeopt.passes.distill import find_teacher
from edgeopt.profiles import load_profile

torch.set_num_threads(1)


def _lowrank(teacher, tmp_path: Path, ratio: float):  # noqa: ANN001, ANN202
    ctx = PassContext(digits16(), load_profile("x86-cpu"), tmp_path / "lowrank", [teacher])
    ctx.step_dir.mkdir(exist_ok=True)
    return make_pass("lowrank", {"rank_ratio": ratio, "ss2d_only": True}).run(teacher, ctx)


def _accuracy(model: torch.nn.Module) -> float:
    return top1_accuracy(torch_outputs(model, digits16().eval.x), digits16().eval.y)


def test_every_loss_term_is_zero_for_identical_models_and_positive_otherwise():
    model = tiny_vmamba().eval()
    x = digits16().train.x[:8]
    with torch.no_grad(), capture_ss2d(model, states=True) as t:
        logits_t = model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad(), capture_ss2d(twin, states=True) as same:
        twin(x)
    other = tiny_vmamba(seed=1).eval()
    with torch.no_grad(), capture_ss2d(other, states=True) as o:
        logits_o = other(x)
    assert float(feature_loss(same.outputs, t.outputs)) == 0 and float(feature_loss(o.outputs, t.outputs)) > 0
    assert float(state_loss(same.states, t.states)) == 0 and float(state_loss(o.states, t.states)) > 0
    steps = torch.tensor([0, 1, 3])
    assert float(state_loss(o.states, t.states, steps)) > 0
    assert (
        float(logit_kl(logits_t, logits_t)) == pytest.approx(0, abs=1e-7)
        and float(logit_kl(logits_o, logits_t)) > 0
    )

    ranks = {
        "layers.0.blocks.0.op.in_proj": 4,
        "layers.0.blocks.0.op.A_logs": 2,
        "layers.0.blocks.0.op.state": 4,
    }
    pairs, made = teacher_factors(model, ranks, digits16().calib.x[:16], whiten=False)
    assert float(svd_loss(factor_pairs(made, ranks), pairs)) == 0
    with torch.no_grad():
        made.get_submodule("layers.0.blocks.0.op").A_logs_u.add_(0.01)
    assert float(svd_loss(factor_pairs(made, ranks), pairs)) > 0

    # where state sizes differ, the projection (initialized to the kept modes) maps teacher states
    block = "layers.0.blocks.0.op"
    modes = kept_modes(made)[block]
    truncated = {block: t.states[block][..., modes]}
    projections = state_projections(truncated, {block: t.states[block]}, {block: modes})
    assert float(state_loss(truncated, {block: t.states[block]}, None, projections)) == 0
    assert float(state_loss({block: truncated[block] + 0.1}, {block: t.states[block]}, None, projections)) > 0


def test_distillation_recovers_accuracy_of_a_factorized_model(tmp_path: Path):
    teacher = trained_teacher()
    teacher_acc = _accuracy(teacher.module)
    student = _lowrank(teacher, tmp_path, 0.2)
    before = _accuracy(student.load_module())
    assert teacher_acc > 0.85 and before < teacher_acc - 0.03  # the factorization costs accuracy
    ctx = PassContext(digits16(), load_profile("x86-cpu"), tmp_path / "distill", [teacher, student])
    ctx.step_dir.mkdir()
    config = {"steps": 40, "batch_size": 32, "lr": 3e-3, "eval_every": 10, "patience": 10}
    distilled = make_pass("distill", config).run(student, ctx)
    after = _accuracy(distilled.load_module())
    assert after >= before + 0.03, (teacher_acc, before, after)
    assert ctx.metrics["steps"] == 40 and ctx.metrics["history"][-1]["feat"] >= 0


def _setup(tmp_path: Path):  # noqa: ANN202
    teacher = trained_teacher()
    student = _lowrank(teacher, tmp_path, 0.3)
    edit = student.edits[-1]
    pairs, made = teacher_factors(teacher.module, edit["ranks"], digits16().calib.x[:128], whiten=False)
    return teacher, student, edit["ranks"], pairs, kept_modes(made)


def test_distill_is_deterministic_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    teacher, student, ranks, pairs, modes = _setup(tmp_path)
    settings = DistillSettings(steps=8, batch_size=16, eval_every=2, patience=100, state_steps=4, seed=3)

    def run(work_dir: Path | None) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(student.load_module())
        distill(model, teacher.module, digits16(), ranks, pairs, settings, modes, work_dir, progress=False)
        return model.state_dict()

    first, second = run(None), run(None)
    assert all(torch.equal(first[k], second[k]) for k in first)

    losses = distill_module._losses
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6; the checkpoint of step 4 survives
            raise KeyboardInterrupt
        return losses(*args, **kwargs)

    monkeypatch.setattr(distill_module, "_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "work")
    monkeypatch.setattr(distill_module, "_losses", losses)
    assert (tmp_path / "work" / "resume.pt").is_file()
    resumed = run(tmp_path / "work")
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_early_stopping_ends_a_run_that_does_not_improve(tmp_path: Path):
    teacher, student, ranks, pairs, modes = _setup(tmp_path)
    model = copy.deepcopy(student.load_module())
    settings = DistillSettings(steps=100, batch_size=16, lr=1e-12, eval_every=2, patience=2, state_steps=4)
    metrics = distill(model, teacher.module, digits16(), ranks, pairs, settings, modes, progress=False)
    assert metrics["stopped_early"] and metrics["steps"] == 4


def test_teacher_is_the_artifact_before_the_latest_lowrank(tmp_path: Path):
    teacher = trained_teacher()
    student = _lowrank(teacher, tmp_path, 0.5)
    found, edit = find_teacher(student, [teacher, student])
    assert found is teacher and edit["edit"] == "lowrank"
    with pytest.raises(InputError, match="put a lowrank pass before it"):
        find_teacher(teacher, [teacher])
