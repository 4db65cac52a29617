"""Object detection: RGB–IR images with boxes, the TAL loss, decode + NMS, COCO mAP50 / mAP50-95."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from edgeopt.tasks import Task
from edgeopt.tasks.detection_loss import detection_loss
from edgeopt.tasks.yolo_decode import postprocess

STRIDES = (8, 16, 32)


@dataclass
class DetectionTask(Task):
    """Images (N, C, H, W) uint8 -> float [0, 1]; primary metric COCOeval mAP@0.5 ('accuracy')."""

    img_size: int
    num_classes: int
    strides: tuple[int, ...] = STRIDES
    conf_threshold: float = 0.001
    iou_threshold: float = 0.6
    max_det: int = 100

    name: ClassVar[str] = "detection"
    metric: ClassVar[str] = "mAP50"

    @classmethod
    def for_splits(cls, splits: Any) -> DetectionTask:
        return cls(img_size=int(splits.eval.images.shape[-1]), num_classes=int(splits.num_classes))

    def inputs(self, split: Any, limit: int | None = None) -> torch.Tensor:
        return to_input(split.images[:limit])

    def decide(self, outputs: np.ndarray) -> np.ndarray:
        """Per anchor: the class it would detect at score >= 0.25, or -1 (background)."""
        logits = np.asarray(outputs)[..., 4:]
        return np.where(logits.max(-1) >= np.log(0.25 / 0.75), logits.argmax(-1), -1)

    def batch(self, split: Any, idx: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        idx = torch.as_tensor(idx).tolist()
        x = to_input(split.images[idx])
        targets = [(torch.as_tensor(split.boxes[i]).float().reshape(-1, 4), torch.as_tensor(split.labels[i]).long())
                   for i in idx]  # fmt: skip
        return x, targets

    def loss(self, outputs: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return detection_loss(outputs, targets, self.img_size, self.strides)

    def decode(self, outputs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return postprocess(np.asarray(outputs), self.img_size, self.strides, self.conf_threshold,
                           self.iou_threshold, self.max_det)  # fmt: skip

    def score(self, outputs: np.ndarray, split: Any) -> dict[str, float]:
        return self.score_detections(self.decode(outputs), split)

    def score_detections(self, detections: list, split: Any) -> dict[str, float]:
        return score_detections(detections, targets_of(split), self.num_classes)

    def bundle_eval(self, split: Any) -> dict[str, Any]:
        return {"targets": targets_of(split), "postprocess": {
            "kind": "yolo", "img_size": self.img_size, "strides": list(self.strides),
            "num_classes": self.num_classes, "conf_threshold": self.conf_threshold,
            "iou_threshold": self.iou_threshold, "max_det": self.max_det}}  # fmt: skip


def targets_of(split: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(b, dtype=np.float32).reshape(-1, 4), np.asarray(lab, dtype=np.int64))
            for b, lab in zip(split.boxes, split.labels, strict=True)]  # fmt: skip


def score_detections(detections: list, targets: list, num_classes: int) -> dict[str, float]:
    """COCOeval mAP50 ('accuracy', the primary metric) and mAP50-95 of decoded detections."""
    from edgeopt.metrics.coco import coco_map

    result = coco_map(detections, targets, num_classes)
    return {"accuracy": float(result["map50"]), "map50": float(result["map50"]),
            "map50_95": float(result["map50_95"])}  # fmt: skip


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (the detector's input convention)."""
    return torch.as_tensor(np.asarray(images)).float().div_(255.0)
