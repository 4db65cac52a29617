"""Datasets with fixed train / calibration / eval splits, registered by name.

A dataset factory takes the recipe's keyword arguments and returns `Splits`
(classification) or `edgeopt.data.detection.DetectionSplits` (RGB–IR detection).
Calibration data feeds quantization and rank selection; accuracy is only ever
reported on the eval split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgeopt.registry import Registry

if TYPE_CHECKING:
    from edgeopt.data.detection import DetectionSplits


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.x[i : i + batch_size], self.y[i : i + batch_size])
            for i in range(0, len(self), batch_size)
        ]


@dataclass(frozen=True)
class Splits:
    train: Split
    calib: Split
    eval: Split
    num_classes: int


DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "edgeopt.datasets")


def load_dataset(name: str, **kwargs: Any) -> Splits | DetectionSplits:
    from edgeopt.errors import InputError

    factory = DATASETS.get(name)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"dataset '{name}' rejected its arguments: {exc}") from exc


from edgeopt.data import digits as _digits  # noqa: E402,F401  (registers built-ins)
from edgeopt.data import rgbt as _rgbt  # noqa: E402,F401
