"""Tasks: what a model is *for* — its data, loss, metric and post-processing, in one object.

Passes, exporters and the profiler stay task-blind: they ask the task for network inputs
(`inputs`), a training batch and its loss (`batch`, `loss`), and a score for raw model outputs
(`score`). The primary score is `accuracy` in [0, 1] (top-1 for classifiers, mAP50 for
detectors); budgets' `max_accuracy_drop` are points (x100) of it, and `metric` names it.
The task of a dataset follows from its splits (`task_for`), so recipes need no task key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F


class Task(ABC):
    name: ClassVar[str]
    metric: ClassVar[str]  # the primary metric's display name ("top-1", "mAP50")

    @abstractmethod
    def inputs(self, split: Any, limit: int | None = None) -> torch.Tensor:
        """The split's network inputs (the first `limit`), float32 (N, ...)."""

    def decide(self, outputs: np.ndarray) -> np.ndarray:
        """The decision each output stands for (parity checks count agreements): the arg-max class."""
        return np.asarray(outputs).argmax(-1)

    @abstractmethod
    def batch(self, split: Any, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Inputs and targets of the samples `idx` (targets are whatever `loss` takes)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor: ...

    @abstractmethod
    def score(self, outputs: np.ndarray, split: Any) -> dict[str, float]:
        """Scores of raw model outputs on a split: `accuracy` (primary, [0, 1]) and extras."""

    @abstractmethod
    def bundle_eval(self, split: Any) -> dict[str, Any]:
        """`make_bundle` keyword arguments that let a device agent score the split (eval_y, or
        targets + postprocess for outputs the agent post-processes and the host scores)."""


class ClassificationTask(Task):
    """Integer labels, cross-entropy, top-1."""

    name, metric = "classification", "top-1"

    def inputs(self, split: Any, limit: int | None = None) -> torch.Tensor:
        return split.x[:limit]

    def batch(self, split: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split.x[idx], split.y[idx]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def score(self, outputs: np.ndarray, split: Any) -> dict[str, float]:
        logits = np.asarray(outputs)
        y = np.asarray(split.y)
        ce = float(F.cross_entropy(torch.from_numpy(logits).float(), torch.from_numpy(y).long()))
        return {"accuracy": float((logits.argmax(-1) == y).mean()), "cross_entropy": ce}

    def bundle_eval(self, split: Any) -> dict[str, Any]:
        return {"eval_y": np.asarray(split.y)}


def task_for(splits: Any) -> Task:
    """The task a dataset's splits are for: detection splits carry boxes, the rest are labels."""
    if hasattr(splits.eval, "boxes"):
        from edgeopt.tasks.detection import DetectionTask

        return DetectionTask.for_splits(splits)
    return ClassificationTask()
