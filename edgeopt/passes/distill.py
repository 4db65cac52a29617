"""`distill` pass: structure-aware distillation after `lowrank` (DLRMamba).

Teacher = the artifact before the most recent `lowrank` step (found in `ctx.history`), student =
the current artifact. See `edgeopt.lowrank.distill` for the loss and the training loop; the pass
resumes from `resume.pt` in its step directory.
"""

from __future__ import annotations

from dataclasses import fields

from pydantic import Field

from edgeopt.artifact import TORCH, ModelArtifact
from edgeopt.errors import InputError
from edgeopt.lowrank.distill import DistillSettings, distill, kept_modes
from edgeopt.lowrank.plan import teacher_factors
from edgeopt.passes import Pass, PassConfig, PassContext, register_pass


class DistillConfig(PassConfig):
    steps: int = Field(150, ge=1, description="optimizer steps (upper bound; early stopping may end sooner)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    w_task: float = Field(1.0, ge=0, description="cross-entropy on labels")
    w_svd: float = Field(0.5, ge=0, description="student factors vs the teacher's sqrt(S)-scaled SVD factors")
    w_state: float = Field(0.1, ge=0, description="MSE of scan hidden states (sampled steps)")
    w_feat: float = Field(1.5, ge=0, description="MSE of SS2D block outputs")
    w_kl: float = Field(0.0, ge=0, description="soft-target logit KL")
    temperature: float = Field(2.0, gt=0)
    state_steps: int = Field(16, ge=1, description="scan positions sampled per block for L_state")
    eval_every: int = Field(25, ge=1, description="steps between calibration-split evaluations")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock cap (makes results timing-dependent)"
    )


@register_pass
class DistillPass(Pass):
    name = "distill"
    uses_profile = False  # same result for every hardware profile: shared across profiles
    Config = DistillConfig
    config: DistillConfig

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from edgeopt.passes.lowrank import copy_module

        teacher_artifact, edit = find_teacher(artifact, ctx.history)
        teacher, student = teacher_artifact.load_module(), copy_module(artifact)
        calib_x = ctx.task.inputs(ctx.splits.calib, edit.get("calib_samples", 128))
        pairs, made = teacher_factors(teacher, edit["ranks"], calib_x, bool(edit.get("whiten")),
                                      edit.get("state_modes"))  # recorded by lowrank (older edits: recomputed)
        options = self.config.model_dump()
        settings = DistillSettings(**{f.name: options[f.name] for f in fields(DistillSettings) if f.name in options},
                                   seed=ctx.seed)  # fmt: skip
        ctx.metrics.update(
            distill(
                student, teacher, ctx.splits, edit["ranks"], pairs, settings, kept_modes(made), ctx.step_dir
            )
        )
        return artifact.with_module(student, ctx.step_dir / "model.safetensors")


def find_teacher(artifact: ModelArtifact, history: list[ModelArtifact]) -> tuple[ModelArtifact, dict]:
    """The artifact just before the latest `lowrank` edit, and that edit."""
    if artifact.format != TORCH:
        raise InputError("distill needs a PyTorch artifact; put it before export")
    indices = [i for i, e in enumerate(artifact.edits) if e["edit"] == "lowrank"]
    if not indices:
        raise InputError("distill needs a factorized student: put a lowrank pass before it")
    before = artifact.edits[: indices[-1]]
    for candidate in reversed(history):
        if candidate.format == TORCH and candidate.edits == before:
            return candidate, artifact.edits[indices[-1]]
    raise InputError("distill: no earlier step holds the model before the latest lowrank pass")
