"""Structure-aware distillation of a factorized student from its full-rank teacher (DLRMamba).

loss = w_task L_task + w_svd L_SVD + w_state L_state + w_feat L_feat (+ w_kl KL). AdamW with a cosine
schedule; every `eval_every` steps the student's primary metric (the task's: top-1, mAP50) on the
calibration split (held out from training, and never the split accuracy is reported on) decides early stopping and which weights
are kept. Batches and sampled scan steps are a pure function of (seed, step), so a run resumed
from `work_dir/resume.pt` continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeopt.evaluate import torch_outputs
from edgeopt.fileio import write_with
from edgeopt.lowrank.losses import (
    Pairs,
    capture_ss2d,
    feature_loss,
    logit_kl,
    state_loss,
    state_projections,
    svd_loss,
)
from edgeopt.lowrank.plan import factor_pairs
from edgeopt.progress import progress as track_progress
from edgeopt.tasks import Task, task_for

RESUME = "resume.pt"


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 150
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    w_task: float = 1.0
    w_svd: float = 0.5
    w_state: float = 0.1
    w_feat: float = 1.5
    w_kl: float = 0.0
    temperature: float = 2.0
    state_steps: int = 16
    eval_every: int = 25
    patience: int = 3
    max_seconds: float | None = None
    seed: int = 0


def distill(
    student: nn.Module,
    teacher: nn.Module,
    splits: Any,
    ranks: dict[str, int],
    teacher_pairs: Pairs,
    settings: DistillSettings,
    kept_modes: dict[str, torch.Tensor] | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    task: Task | None = None,
) -> dict[str, Any]:
    """Train `student` in place (ending on its best calibration checkpoint); returns metrics.
    `task` (default: the splits' own) gives the batches, L_task and the calibration score."""
    s = settings
    task = task or task_for(splits)
    torch.manual_seed(s.seed)
    teacher.eval()  # only ever run under no_grad
    projections = _projections(student, teacher, task.inputs(splits.train, 2), kept_modes)
    params = [*student.parameters(), *projections.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, s.steps) / s.steps))
    )
    state = {"step": 0, "best": _score(student, task, splits.calib), "best_step": 0, "bad_evals": 0, "history": []}
    best_weights = _clone(student)
    resume = Path(work_dir) / RESUME if work_dir else None
    run_id = _fingerprint(student, teacher, ranks, settings)
    saved = torch.load(resume, map_location="cpu", weights_only=True) if resume and resume.is_file() else None
    if saved is not None and saved.get("run_id") == run_id:  # a checkpoint of another run is ignored
        student.load_state_dict(saved["student"])
        projections.load_state_dict(saved["projections"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        best_weights, state = saved["best_weights"], saved["state"]
    start_step, start = state["step"], time.perf_counter()
    with track_progress("distill", total=s.steps, completed=start_step, enabled=progress) as bar:
        while state["step"] < s.steps and state["bad_evals"] < s.patience:
            step = state["step"]
            student.train()
            terms = _losses(student, teacher, task, splits.train, ranks, teacher_pairs, projections, s, step)
            loss = sum(w * terms[k] for k, w in _weights(s).items() if w and k in terms)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            state["step"] = step + 1
            out_of_time = s.max_seconds is not None and time.perf_counter() - start > s.max_seconds
            if state["step"] % s.eval_every == 0 or state["step"] == s.steps or out_of_time:
                score = _score(student, task, splits.calib)
                state["history"].append({"step": state["step"], "calib_accuracy": score[0], "calib_tiebreak": score[1],
                                         **{k: float(v.detach()) for k, v in terms.items()}})  # fmt: skip
                if score > tuple(state["best"]):
                    state.update(best=score, best_step=state["step"], bad_evals=0)
                    best_weights = _clone(student)
                else:
                    state["bad_evals"] += 1
                if resume is not None:
                    _save(resume, run_id, student, projections, optimizer, schedule, best_weights, state)
            bar.update(state["step"], info=f"loss {float(loss.detach()):.3f}")
            if out_of_time:
                break
    student.load_state_dict(best_weights)
    student.eval()
    return {"steps": state["step"], "best_step": state["best_step"], "calib_accuracy": state["best"][0],
            "metric": task.metric,
            "stopped_early": state["step"] < s.steps, "history": state["history"]}  # fmt: skip


def kept_modes(model: nn.Module) -> dict[str, torch.Tensor]:
    """State modes each truncated SS2D block kept (set when the truncation picked them)."""
    return {
        name: m.kept_modes for name, m in model.named_modules() if getattr(m, "kept_modes", None) is not None
    }


def _weights(s: DistillSettings) -> dict[str, float]:
    return {"task": s.w_task, "svd": s.w_svd, "state": s.w_state, "feat": s.w_feat, "kl": s.w_kl}


def _losses(student, teacher, task: Task, train: Any, ranks, teacher_pairs, projections, s: DistillSettings, step: int):  # noqa: ANN001
    x, y = task.batch(train, _batch_indices(len(train), s, step))
    with torch.no_grad(), capture_ss2d(teacher, states=s.w_state > 0) as t:
        t_logits = teacher(x)
    with capture_ss2d(student, states=s.w_state > 0) as c:
        logits = student(x)
    terms = {"task": task.loss(logits, y)}
    if s.w_svd and teacher_pairs:
        terms["svd"] = svd_loss(factor_pairs(student, ranks), teacher_pairs)
    # A model without SS2D blocks (an MLP, a CNN) has no states or block outputs to match:
    # it distils through the task, factor and logit terms alone.
    if s.w_state and t.states:  # each block samples its own scan positions (blocks differ in length)
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        terms["state"] = torch.stack([
            state_loss({n: c.states[n]}, {n: h}, _positions(h.shape[2], s.state_steps, g), projections)
            for n, h in t.states.items()
        ]).mean()  # fmt: skip
    if s.w_feat and t.outputs:
        terms["feat"] = feature_loss(c.outputs, t.outputs)
    if s.w_kl:
        terms["kl"] = logit_kl(logits, t_logits, s.temperature)
    return terms


def _positions(length: int, count: int, g: torch.Generator) -> torch.Tensor | None:
    return None if length <= count else torch.randperm(length, generator=g)[:count]


def _batch_indices(n: int, s: DistillSettings, step: int) -> torch.Tensor:
    """The step's batch: epoch e is a permutation seeded by (seed, e), so it depends only on the step."""
    per_epoch = max(1, n // s.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 7919 + epoch))
    return order[index * s.batch_size : (index + 1) * s.batch_size]


def _projections(
    student: nn.Module, teacher: nn.Module, x: torch.Tensor, modes: dict | None
) -> nn.ModuleDict:
    with torch.no_grad(), capture_ss2d(teacher, True) as t, capture_ss2d(student, True) as c:
        teacher(x)
        student(x)
    return state_projections(c.states, t.states, modes)


def _score(model: nn.Module, task: Task, split: Any) -> tuple[float, float]:
    """(primary metric, tie-breaker) on a split, higher is better: top-1 then -cross-entropy for a
    classifier, mAP50 then mAP50-95 for a detector."""
    scores = task.score(torch_outputs(model, task.inputs(split), batch_size=32), split)
    tiebreak = -scores["cross_entropy"] if "cross_entropy" in scores else scores.get("map50_95", 0.0)
    return (scores["accuracy"], tiebreak)


def _clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fingerprint(
    student: nn.Module, teacher: nn.Module, ranks: dict[str, int], settings: DistillSettings
) -> str:
    """What makes two runs the same run: the settings, the plan and both models' starting weights."""
    digest = hashlib.sha256(repr((sorted(ranks.items()), settings)).encode())
    for model in (student, teacher):
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save(path: Path, run_id: str, student, projections, optimizer, schedule, best_weights, state) -> None:  # noqa: ANN001
    buffer = io.BytesIO()
    torch.save({"run_id": run_id, "student": student.state_dict(), "projections": projections.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "best_weights": best_weights, "state": state}, buffer)  # fmt: skip
    write_with(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
