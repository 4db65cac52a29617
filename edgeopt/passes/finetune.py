"""`finetune` pass: recover accuracy after a compression pass with task-loss training.

The cheap counterpart of `distill`: a few epochs of the training split on the
current structure (factorized layers included), deterministic with the recipe seed.
"""

from __future__ import annotations

from pydantic import Field

from edgeopt.artifact import ModelArtifact
from edgeopt.passes import Pass, PassConfig, PassContext, register_pass
from edgeopt.training import train_classifier


class FinetuneConfig(PassConfig):
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)


@register_pass
class FinetunePass(Pass):
    uses_profile = False
    name = "finetune"
    Config = FinetuneConfig
    config: FinetuneConfig

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        from edgeopt.passes.lowrank import copy_module

        model = copy_module(artifact)
        ctx.metrics["eval_top1"] = train_classifier(
            model, ctx.splits, epochs=self.config.epochs, lr=self.config.lr,
            batch_size=self.config.batch_size, seed=ctx.seed,
        )
        return artifact.with_module(model, ctx.step_dir / "model.safetensors")
