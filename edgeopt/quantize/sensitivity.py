"""Per-layer mixed precision: find the layers int8 hurts most and keep them in float.

0. Everything int8 first: when that already holds the budget, no sensitivity is
   measured (the common case, and what keeps `mode: auto` cheap in CI).
1. Sensitivity: quantize one layer at a time (everything else float) and measure
   the output's noise-to-signal ratio against the float model on the
   calibration split (accuracy is never judged on calibration data).
2. Selection: keep the k most sensitive layers in float, k = 0, 1, ..., until the
   top-1 drop on the eval split is within the accuracy budget — the same figure
   the recipe's budget gates on.

Format-agnostic: the caller passes `build(only, keep_float) -> path` (a
quantizer) and `run(path, x) -> outputs` (a runtime).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Build = Callable[[Sequence[str] | None, Sequence[str]], Path]
Run = Callable[[Path, np.ndarray], np.ndarray]


def noise_to_signal(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    return float(((ref - candidate) ** 2).sum() / max(float((ref**2).sum()), 1e-30))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 in points (0–100), the unit of the profiles' `max_accuracy_drop`."""
    return 100.0 * float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())


def layer_sensitivity(layers: Sequence[str], build: Build, run: Run, x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Noise-to-signal ratio of the output with only that layer quantized, per layer."""
    return {layer: noise_to_signal(reference, run(build([layer], []), x)) for layer in layers}


@dataclass
class MixedPrecision:
    keep_float: list[str]
    path: Path
    accuracy: float
    float_accuracy: float
    sensitivity: dict[str, float]
    trials: list[dict[str, object]] = field(default_factory=list)  # (kept in float, eval top-1) per step

    @property
    def drop(self) -> float:
        return self.float_accuracy - self.accuracy

    def report(self) -> dict[str, object]:
        return {
            "kept_in_float": {name: {"sensitivity_nsr": self.sensitivity[name]} for name in self.keep_float},
            "sensitivity_nsr": self.sensitivity,
            "trials": self.trials,
            "accuracy": self.accuracy,
            "accuracy_drop": self.drop,
        }


def select_float_layers(
    layers: Sequence[str],
    build: Build,
    run: Run,
    calib_x: np.ndarray,
    calib_reference: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray | Callable[[np.ndarray], float],
    float_accuracy: float,
    max_accuracy_drop: float,
) -> MixedPrecision:
    """Fewest most-sensitive layers in float that bring the accuracy drop on (`eval_x`, `eval_y`) — the
    calibration split, so the reported eval accuracy stays held out — within `max_accuracy_drop` points.
    `eval_y` is integer labels (top-1) or the task's scorer of raw outputs (points, 0–100)."""
    score = eval_y if callable(eval_y) else (lambda outputs: accuracy(outputs, eval_y))
    path = build(None, [])
    acc = score(run(path, eval_x))
    trials: list[dict[str, object]] = [{"kept_in_float": [], "accuracy": acc}]
    if float_accuracy - acc <= max_accuracy_drop or not layers:
        return MixedPrecision([], path, acc, float_accuracy, {}, trials)
    sensitivity = layer_sensitivity(layers, build, run, calib_x, calib_reference)
    ranked = sorted(layers, key=sensitivity.__getitem__, reverse=True)
    for k in range(1, len(ranked) + 1):
        keep = ranked[:k]
        path = build(None, keep)
        acc = score(run(path, eval_x))
        trials.append({"kept_in_float": list(keep), "accuracy": acc})
        if float_accuracy - acc <= max_accuracy_drop or k == len(ranked):
            return MixedPrecision(list(keep), path, acc, float_accuracy, sensitivity, trials)
    raise AssertionError("unreachable")
