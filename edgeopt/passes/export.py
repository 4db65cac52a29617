"""`export` pass: PyTorch → the profile's deployable format, then a parity check.

`format: auto` takes the first runtime in the profile's preference list that can
be built on this host (TensorRT engines are built on the device itself, so a
Jetson profile exports ONNX here and the device builds the engine).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from edgeopt.artifact import ModelArtifact
from edgeopt.evaluate import artifact_outputs, parity, torch_outputs
from edgeopt.exporters import RUNTIME_FORMAT, SUFFIX, ExportError, export
from edgeopt.passes import Pass, PassConfig, PassContext, register_pass
from edgeopt.profiles import Profile
from edgeopt.progress import progress

HOST_FORMATS = ("onnx", "tflite")


class ExportConfig(PassConfig):
    # pte (ExecuTorch, custom scan op) is chosen by name; auto stays on the portable formats
    format: Literal["auto", "onnx", "tflite", "pte"] = "auto"
    parity_samples: int = Field(256, ge=1)
    max_rel_error: float = Field(1e-4, gt=0, description="max |error| / max |reference output|")
    min_top1_agreement: float = Field(0.99, ge=0, le=1)


def host_format(profile: Profile) -> str:
    for runtime in profile.runtimes:
        fmt = RUNTIME_FORMAT[runtime]
        if fmt in HOST_FORMATS:
            return fmt
    return "onnx"


@register_pass
class ExportPass(Pass):
    name = "export"
    Config = ExportConfig
    config: ExportConfig

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        fmt = host_format(ctx.profile) if self.config.format == "auto" else self.config.format
        module = artifact.load_module()
        with progress(f"exporting to {fmt}"):  # no total: a heartbeat line in CI logs
            path = export(fmt, module, artifact.example_input(2), ctx.step_dir / f"model{SUFFIX[fmt]}")
        exported = replace(artifact, format=fmt, path=path, module=None)
        x = ctx.task.inputs(ctx.splits.eval, self.config.parity_samples).numpy()
        check = parity(torch_outputs(module, x), artifact_outputs(exported, x), ctx.task.decide)
        ctx.metrics["parity"] = check
        if check["max_rel"] > self.config.max_rel_error or check["top1_agreement"] < self.config.min_top1_agreement:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"{fmt} parity check failed: max rel error {check['max_rel']:.2e} "
                f"(limit {self.config.max_rel_error:.0e}), top-1 agreement {check['top1_agreement']:.3f} "
                f"(limit {self.config.min_top1_agreement})"
            )
        return exported
