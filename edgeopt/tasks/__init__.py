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
    def inputs(self, split: Any) -> torch.Tensor:
        """The split's network inputs, float32 (N, ...)."""

    @abstractmethod
    def batch(self, split: Any, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Inputs and targets of the samples `idx` (targets are whatever `loss` takes)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor: ...

    @abstractmethod
    def score(self, outputs: np.ndarray, split: Any) -> dict[str, float]:
        """Scores of raw model outputs on a split: `accuracy` (primary, [0, 1]) and extras."""

    def postprocess_meta(self) -> dict[str, Any] | None:
        """What a device agent needs to post-process raw outputs itself (None: nothing)."""
        return None

    def labels(self, split: Any) -> np.ndarray | None:
        """Integer labels an agent scores top-1 against (None: the host scores the outputs)."""
        return None

    def score_detections(self, detections: list, split: Any) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} has no detections to score")


class ClassificationTask(Task):
    """Integer labels, cross-entropy, top-1."""

    name, metric = "classification", "top-1"

    def inputs(self, split: Any) -> torch.Tensor:
        return split.x

    def batch(self, split: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split.x[idx], split.y[idx]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def score(self, outputs: np.ndarray, split: Any) -> dict[str, float]:
        logits = np.asarray(outputs)
        y = np.asarray(split.y)
        ce = float(F.cross_entropy(torch.from_numpy(logits).float(), torch.from_numpy(y).long()))
        return {"accuracy": float((logits.argmax(-1) == y).mean()), "cross_entropy": ce}

    def labels(self, split: Any) -> np.ndarray:
        return np.asarray(split.y)


def task_for(splits: Any) -> Task:
    """The task a dataset's splits are for: detection splits carry boxes, the rest are labels."""
    if hasattr(splits.eval, "boxes"):
        from edgeopt.tasks.detection import DetectionTask

        return DetectionTask.for_splits(splits)
    return ClassificationTask()
