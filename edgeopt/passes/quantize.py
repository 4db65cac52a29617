"""`quantize` pass: PyTorch → fp32 export → int8 / fp16 file, checked against the float model.

Quantization is done by each runtime's own toolchain (onnxruntime.quantization,
ai-edge-quantizer); this pass picks the recipe, feeds the calibration split,
optionally keeps the most sensitive layers in float until the accuracy budget
holds, and refuses a result whose outputs drift past the precision's parity
thresholds.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from edgeopt.artifact import TORCH, ModelArtifact
from edgeopt.errors import InputError
from edgeopt.evaluate import run_onnx, run_tflite, size_mb, torch_outputs
from edgeopt.exporters import SUFFIX, ExportError
from edgeopt.exporters.onnx import export_onnx, strip_debug_metadata
from edgeopt.exporters.tflite import export_tflite, strip_tensor_names
from edgeopt.passes import Pass, PassConfig, PassContext, register_pass
from edgeopt.passes.export import host_format
from edgeopt.profiles import Profile
from edgeopt.quantize import onnx_quant, parity, quantizable_layers, tflite_quant
from edgeopt.quantize.op_location import runtime_rejection, with_module
from edgeopt.quantize.sensitivity import select_float_layers

RUNNERS = {"onnx": run_onnx, "tflite": run_tflite}


def make_deployable(path: Path) -> Path:
    """Drop the exporters' debug records that quantization needed (ONNX metadata and names,
    TFLite tensor names) in place; the computation is unchanged."""
    if path.suffix == ".onnx":
        strip_debug_metadata(path)
    elif path.suffix == ".tflite":
        strip_tensor_names(path)
    return path


def deployable_size_mb(path: Path) -> float:
    """Size of the file as shipped (`make_deployable`), measured on a copy."""
    with tempfile.TemporaryDirectory() as work:
        stripped = Path(work) / path.name
        shutil.copy(path, stripped)
        return size_mb(make_deployable(stripped))


class QuantizeConfig(PassConfig):
    format: Literal["auto", "onnx", "tflite"] = "auto"
    mode: Literal["auto", "static", "dynamic", "fp16"] = Field(
        "static", description="auto: from the profile's default_precision (int8: static + mixed_precision; fp16: onnx fp16)"
    )
    per_channel: bool = True
    calibration_samples: int = Field(128, ge=1)
    mixed_precision: bool = False
    max_accuracy_drop: float | None = Field(None, ge=0, description="top-1 points; default: the profile budget")
    keep_float: list[str] = Field(default_factory=list, description="module paths always kept in float")
    parity_samples: int = Field(256, ge=1)
    min_cosine: float | None = Field(None, ge=-1, le=1, description="override the precision's parity threshold")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_rel_error: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _supported(self) -> QuantizeConfig:
        if self.format == "tflite" and self.mode == "fp16":
            raise ValueError("tflite offers int8 static or dynamic here; use format: onnx for fp16")
        return self


@register_pass
class QuantizePass(Pass):
    name = "quantize"
    Config = QuantizeConfig
    config: QuantizeConfig

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        cfg = resolved(self.config, ctx.profile)
        fmt = host_format(ctx.profile) if cfg.format == "auto" else cfg.format
        if artifact.format != TORCH:
            raise ExportError(f"quantize needs the PyTorch model, got a {artifact.format} artifact: put it before export")
        module = artifact.load_module()
        layers = quantizable_layers(module)
        unknown = sorted(set(cfg.keep_float) - {name for name, _ in module.named_modules()})
        if unknown:
            raise ExportError(f"quantize: keep_float names no module: {', '.join(unknown)} (layers: {', '.join(layers)})")
        task = ctx.task
        calib_x = task.inputs(ctx.splits.calib, cfg.calibration_samples).numpy()
        eval_x = task.inputs(ctx.splits.eval).numpy()

        def accuracy(outputs: np.ndarray, split=ctx.splits.eval) -> float:  # noqa: ANN001
            """The task's primary metric in points (0–100), the unit of `max_accuracy_drop`."""
            return 100.0 * task.score(outputs, split)["accuracy"]

        module_names = [name for name, _ in module.named_modules() if name]

        def run(path: Path, x: np.ndarray) -> np.ndarray:
            try:
                return RUNNERS[fmt](path, x)
            except Exception as exc:  # the runtime refused the quantized graph
                raise ExportError(f"quantize {cfg.mode}: " + runtime_rejection(fmt, path, exc, module_names)) from exc

        reference = torch_outputs(module, eval_x)
        float_accuracy = accuracy(reference)
        out = ctx.step_dir / f"model{SUFFIX[fmt]}"

        with tempfile.TemporaryDirectory() as work:
            example = artifact.example_input(2)
            try:
                fp32_path = Path(work) / f"fp32{SUFFIX[fmt]}"
                # the quantizers map nodes to modules through the exporters' metadata and names
                exporter = export_onnx if fmt == "onnx" else export_tflite
                fp32 = exporter(module, example, fp32_path, keep_metadata=True)
            except ExportError as exc:
                raise ExportError(with_module(str(exc), module, example)) from exc
            counter = iter(range(10**6))

            def build(only: Sequence[str] | None, keep: Sequence[str], path: Path | None = None) -> Path:
                target = path or Path(work) / f"trial{next(counter)}{SUFFIX[fmt]}"
                return quantize_file(fmt, cfg.mode, fp32, calib_x, target, cfg.per_channel, [*cfg.keep_float, *keep], only,
                                     symmetric_activations=ctx.profile.runtimes[0] == "tensorrt")

            mixed = None
            if cfg.mixed_precision:
                budget = cfg.max_accuracy_drop if cfg.max_accuracy_drop is not None else ctx.profile.budgets.max_accuracy_drop
                if budget is None:
                    raise ExportError("quantize: mixed_precision needs max_accuracy_drop (in the pass or the profile budgets)")
                candidates = [name for name in layers if name not in cfg.keep_float]
                # the budget is tuned on the whole calibration split; eval stays held out for the report
                tune_x = task.inputs(ctx.splits.calib).numpy()

                def tune_score(outputs: np.ndarray) -> float:
                    return accuracy(outputs, ctx.splits.calib)

                mixed = select_float_layers(
                    candidates, build, run, calib_x, torch_outputs(module, calib_x), tune_x, tune_score,
                    tune_score(torch_outputs(module, tune_x)), budget
                )
                if mixed.drop > budget:
                    raise ExportError(
                        f"quantize: {fmt} {cfg.mode} drops {task.metric} by {mixed.drop:.2f} points even with every layer in float "
                        f"(budget {budget}); use a higher precision"
                    )
            keep_float = [*cfg.keep_float, *(mixed.keep_float if mixed else [])]
            precision = "fp16" if cfg.mode == "fp16" else "mixed" if keep_float else "int8"
            fp32_mb, n = deployable_size_mb(fp32), cfg.parity_samples
            build(None, mixed.keep_float if mixed else [], out)
            try:  # a file that does not load or drifts past the thresholds is not left behind
                candidate = run(out, eval_x)
                figures = parity.check(
                    reference[:n], candidate[:n], precision, f"{fmt} {cfg.mode}", decide=task.decide,
                    thresholds=self._thresholds(precision),
                    worst_layer=partial(worst_layer, fmt, fp32, out, eval_x[:8], module_names),
                )
            except ExportError:
                out.unlink(missing_ok=True)
                raise
            make_deployable(out)  # after the check: its worst-layer search matches names with fp32

        quant_accuracy = accuracy(candidate)
        ctx.metrics.update(
            format=fmt,
            mode=cfg.mode,
            precision=precision,
            size_mb_fp32=fp32_mb,
            size_mb=size_mb(out),
            size_ratio=fp32_mb / size_mb(out),
            accuracy_fp32=float_accuracy,
            accuracy=quant_accuracy,
            accuracy_drop=float_accuracy - quant_accuracy,
            parity=figures,
            kept_in_float=keep_float,
            calibration_samples=len(calib_x) if cfg.mode == "static" else 0,
        )
        if mixed:
            ctx.metrics["mixed_precision"] = mixed.report()
        meta = {**artifact.meta, "quantization": {"format": fmt, "mode": cfg.mode, "kept_in_float": keep_float}}
        return replace(artifact, format=fmt, path=out, precision=precision, module=None, meta=meta)

    def _thresholds(self, precision: str) -> parity.Thresholds:
        base = parity.THRESHOLDS[precision]
        cfg = self.config
        return parity.Thresholds(
            min_cosine=base.min_cosine if cfg.min_cosine is None else cfg.min_cosine,
            min_top1_agreement=base.min_top1_agreement if cfg.min_top1_agreement is None else cfg.min_top1_agreement,
            max_rel=base.max_rel if cfg.max_rel_error is None else cfg.max_rel_error,
        )


def resolved(cfg: QuantizeConfig, profile: Profile) -> QuantizeConfig:
    """`mode: auto` made concrete by the profile's default precision: int8 → static int8 with
    mixed precision (the accuracy budget decides what stays float); fp16 → ONNX fp16."""
    if cfg.mode != "auto":
        return cfg
    precision = profile.default_precision
    if precision in ("int8", "mixed"):
        return cfg.model_copy(update={"mode": "static", "mixed_precision": True})
    if precision == "fp16":
        if cfg.format == "tflite":
            raise InputError(f"quantize mode auto: profile '{profile.name}' wants fp16, which this pass makes for onnx only; "
                             "use format: auto or onnx")
        return cfg.model_copy(update={"mode": "fp16", "format": "onnx"})
    raise InputError(f"quantize mode auto: profile '{profile.name}' wants {precision} (default_precision); "
                     "drop the quantize pass for it or set mode explicitly")


def quantize_file(
    fmt: str,
    mode: str,
    fp32: Path,
    calibration: np.ndarray,
    out: Path,
    per_channel: bool = True,
    keep_float: Sequence[str] = (),
    only: Sequence[str] | None = None,
    symmetric_activations: bool = False,
) -> Path:
    """One fp32 file → one quantized file, by the format's own toolchain. `symmetric_activations`
    (ONNX static): zero-point-0 activations, the only int8 Q/DQ TensorRT builds."""
    if mode == "static" and fmt == "onnx":
        return onnx_quant.quantize_static(fp32, calibration, out, per_channel, keep_float, only,
                                          symmetric_activations=symmetric_activations)
    tools = onnx_quant if fmt == "onnx" else tflite_quant
    if mode == "static":
        return tools.quantize_static(fp32, calibration, out, per_channel, keep_float, only)
    if mode == "dynamic":
        return tools.quantize_dynamic(fp32, out, per_channel, keep_float, only)
    return onnx_quant.convert_fp16(fp32, out, keep_float, only)


def worst_layer(fmt: str, fp32: Path, quantized: Path, x: np.ndarray, layers: list[str]) -> str | None:
    if fmt == "onnx":
        return parity.onnx_worst_layer(fp32, quantized, x)
    return parity.tflite_worst_layer(fp32, quantized, x, layers)
