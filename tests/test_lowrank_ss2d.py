"""Low-Rank SS2D: exact at full rank, fewer parameters as the ratio falls, artifact and ONNX round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from lowrank_fixtures import INPUT_SHAPE, TINY, digits16, tiny_vmamba
from torch import nn

from edgeopt.artifact import TORCH, ModelArtifact, ModelSource, save_weights
from edgeopt.evaluate import parity, run_onnx, torch_outputs
from edgeopt.exporters import export
from edgeopt.lowrank.factors import svd_factors
from edgeopt.lowrank.measure import ss2d_params
from edgeopt.lowrank.modules import FactorizedConv1x1, LowRankSS2D
from edgeopt.lowrank.plan import (
    Selection,
    factorize,
    find_targets,
    input_grams,
    ranks_by_budget,
    ranks_by_energy,
    state_targets,
)
from edgeopt.models.ss2d import SS2D
from edgeopt.passes import PassContext, make_pass
from edgeopt.profiles import load_profile

torch.set_num_threads(1)
ATOL = 1e-5


def _artifact(model: nn.Module, tmp_path: Path) -> ModelArtifact:
    save_weights(model, tmp_path / "teacher.safetensors")
    return ModelArtifact(
        TORCH, tmp_path / "teacher.safetensors", ModelSource("vmamba", TINY), INPUT_SHAPE, module=model
    )


def _lowrank(artifact: ModelArtifact, tmp_path: Path, **config) -> tuple[ModelArtifact, dict]:  # noqa: ANN003
    ctx = PassContext(digits16(), load_profile("x86-cpu"), tmp_path / "lowrank", [artifact])
    ctx.step_dir.mkdir(exist_ok=True)
    return make_pass("lowrank", config).run(artifact, ctx), ctx.metrics


def test_conv1x1_full_rank_is_exact_and_truncation_drops_the_tail():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, 1, stride=2, padding=1)
    x = torch.randn(2, 24, 7, 7)
    holder = nn.Sequential(conv)
    factorize(holder, {"0": 16})
    assert isinstance(holder[0], FactorizedConv1x1)
    torch.testing.assert_close(holder[0](x), conv(x), atol=ATOL, rtol=ATOL)
    u, v = svd_factors(conv.weight.flatten(1), 6)
    s = torch.linalg.svdvals(conv.weight.detach().flatten(1))
    torch.testing.assert_close(
        torch.linalg.matrix_norm(conv.weight.flatten(1) - u @ v), s[6:].norm(), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize(
    "part", ["x_proj_weight", "dt_projs_weight", "A_logs", "in_proj", "out_proj", "state"]
)
def test_each_ss2d_factorization_is_exact_at_full_rank(part: str):
    model = tiny_vmamba().eval()
    x = digits16().eval.x[:4]
    reference = model(x)
    block = next(name for name, m in model.named_modules() if isinstance(m, SS2D))
    target = next(
        (t for t in find_targets(model, Selection(min_features=1)) if t.name == f"{block}.{part}"), None
    )
    full = model.get_submodule(block).d_state if part == "state" else min(target.shape[1:])
    factorize(model, {f"{block}.{part}": full})
    assert part == "state" or f"{block}.{part}" not in {
        t.name for t in find_targets(model, Selection(min_features=1))
    }
    torch.testing.assert_close(model(x), reference, atol=ATOL, rtol=ATOL)


def test_all_ss2d_factorizations_together_exact_at_full_rank_also_whitened():
    model = tiny_vmamba().eval()
    x = digits16().calib.x[:32]
    reference = model(x)
    targets = find_targets(model, Selection(ss2d_only=True, min_features=1))
    full = {t.name: min(t.shape[1:]) for t in targets}
    for grams in ({}, input_grams(model, targets, x)):
        student = copy.deepcopy(model)
        factorize(student, full, grams)
        assert all(isinstance(m, LowRankSS2D) for m in student.modules() if isinstance(m, SS2D))
        torch.testing.assert_close(student(x), reference, atol=1e-4, rtol=1e-4)


def test_whitened_factors_have_lower_output_error_on_calibration_data():
    model = tiny_vmamba().eval()
    x = digits16().calib.x[:64]
    target = next(t for t in find_targets(model) if t.name.endswith("in_proj"))
    gram = input_grams(model, [target], x)[target.name][0]
    w = target.weight[0].double()
    inputs = torch.linalg.cholesky(gram)  # any X with X X^T = gram gives the same output error
    for rank in (2, 4, 8):
        plain = svd_factors(w, rank)
        white = svd_factors(w, rank, gram)
        err = lambda f: torch.linalg.matrix_norm((w - f[0] @ f[1]) @ inputs)  # noqa: E731
        assert err(white) < err(plain)


def test_parameter_count_falls_with_the_rank_ratio(tmp_path: Path):
    teacher = _artifact(tiny_vmamba().eval(), tmp_path)
    counts = []
    for ratio in (0.9, 0.65, 0.6, 0.55, 0.5, 0.3):
        student, metrics = _lowrank(teacher, tmp_path, rank_ratio=ratio, ss2d_only=True)
        counts.append(ss2d_params(student.load_module()))
        assert metrics["params_after"] < metrics["params_before"]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)
    assert counts[4] <= 0.6 * ss2d_params(teacher.module)  # ratio 0.5 removes >= 40% of SS2D parameters


def test_rank_selection_methods(tmp_path: Path):
    model = tiny_vmamba().eval()
    x = digits16().calib.x[:64]
    targets = find_targets(model, Selection(ss2d_only=True))
    grams = input_grams(model, targets, x)
    low, high = ranks_by_energy(targets, 0.5, grams), ranks_by_energy(targets, 0.9, grams)
    assert all(high.get(name, 10**9) >= rank for name, rank in low.items()) and len(low) >= len(high)
    budget = ranks_by_budget(targets, 0.4, grams)
    kept = sum(t.factor_params(budget[t.name]) if t.name in budget else t.params for t in targets)
    assert kept <= 0.4 * sum(t.params for t in targets)
    assert len(set(budget.values())) > 1  # sensitivity spreads the budget unevenly
    teacher = _artifact(model, tmp_path)
    student, _ = _lowrank(teacher, tmp_path, method="budget", rank_ratio=0.5, whiten=True, ss2d_only=True)
    assert ss2d_params(student.load_module()) < ss2d_params(model)


def test_selection_last_blocks_and_patterns(tmp_path: Path):
    model = tiny_vmamba().eval()
    blocks = [n for n, m in model.named_modules() if isinstance(m, SS2D)]
    assert len(blocks) == 2
    last = find_targets(model, Selection(last_blocks=1))
    assert last and all(t.name.startswith(blocks[1]) for t in last)
    assert state_targets(model, Selection(last_blocks=1)) == [f"{blocks[1]}.state"]
    no_a = find_targets(model, Selection(exclude=["*.A_logs"]))
    assert not any(t.name.endswith("A_logs") for t in no_a)
    assert any(t.name == "classifier.head" for t in find_targets(model)) and not any(
        t.name == "classifier.head" for t in find_targets(model, Selection(ss2d_only=True))
    )
    student, metrics = _lowrank(_artifact(model, tmp_path), tmp_path, rank_ratio=0.5, last_blocks=1)
    assert metrics["factorized_layers"] and all(n.startswith(blocks[1]) for n in metrics["factorized_layers"])


def test_factorized_model_round_trips_and_exports_with_parity(tmp_path: Path):
    teacher = _artifact(tiny_vmamba().eval(), tmp_path)
    student, _ = _lowrank(teacher, tmp_path, rank_ratio=0.5, ss2d_only=True)
    x = digits16().eval.x[:32].numpy()
    expected = torch_outputs(student.load_module(), x)
    reloaded = ModelArtifact.from_json(student.to_json())  # edits replayed, then a strict load
    assert reloaded.module is None
    np.testing.assert_array_equal(torch_outputs(reloaded.load_module(), x), expected)
    onnx = export("onnx", reloaded.load_module(), student.example_input(2), tmp_path / "student.onnx")
    check = parity(expected, run_onnx(onnx, x))
    assert check["max_rel"] < 1e-4 and check["top1_agreement"] == 1.0
