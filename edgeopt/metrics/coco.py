"""mAP50 and mAP50-95 with pycocotools' COCOeval, the reference every fusion repo reports.

COCOeval interpolates precision at 101 recall points (as YOLO repos do; 11-point VOC
gives different numbers) and keeps the 100 highest-scoring detections per image.
Categories without ground truth in the evaluated set are left out of the mean.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (K, 4) xyxy, scores (K,), labels (K,)
Target = tuple[np.ndarray, np.ndarray]  # boxes (M, 4) xyxy, labels (M,)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def coco_map(predictions: Sequence[Prediction], targets: Sequence[Target], num_classes: int) -> dict[str, float]:
    """{"map50", "map50_95"} in [0, 1] over all images; predictions and targets align by index."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    images, annotations, detections = [], [], []
    for image_id, ((boxes, labels), (pboxes, pscores, plabels)) in enumerate(zip(targets, predictions, strict=True)):
        gt, pred = _xywh(boxes), _xywh(pboxes)
        extent = np.concatenate([gt[:, :2] + gt[:, 2:], pred[:, :2] + pred[:, 2:]]).max(initial=1.0)
        images.append({"id": image_id, "width": float(extent), "height": float(extent)})
        for (x, y, w, h), c in zip(gt, np.asarray(labels).reshape(-1), strict=True):
            if not 0 <= int(c) < num_classes:
                raise ValueError(f"target label {int(c)} outside 0..{num_classes - 1}")
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c) + 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )
        scores = np.asarray(pscores, dtype=np.float64).reshape(-1)
        for (x, y, w, h), s, c in zip(pred, scores, np.asarray(plabels).reshape(-1), strict=True):
            detections.append({"image_id": image_id, "category_id": int(c) + 1, "bbox": [x, y, w, h], "score": float(s)})
    if not annotations:
        raise ValueError("mAP needs at least one ground-truth object")
    if not detections:
        return {"map50": 0.0, "map50_95": 0.0}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the stats table
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        }
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    map50_95, map50 = (max(0.0, float(v)) for v in evaluator.stats[:2])
    return {"map50": map50, "map50_95": map50_95}
