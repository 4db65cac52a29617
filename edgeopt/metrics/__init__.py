"""Task metrics: COCO mAP for detectors (pycocotools)."""

from edgeopt.metrics.coco import coco_map

__all__ = ["coco_map"]
