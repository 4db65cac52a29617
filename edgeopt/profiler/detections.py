"""Host-side scoring of a detector bundle's device results: COCO mAP from the agent's detections.

The agent decodes and runs NMS on the device (numpy only) but has no pycocotools; the host reads
the ground truth from the bundle's own eval.npz, so any bundle result can be scored without the
dataset it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeopt.errors import InputError
from edgeopt.profiler.bundle import read_meta


def bundle_targets(bundle_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    meta = read_meta(bundle_dir)
    with np.load(Path(bundle_dir) / meta.get("eval", "eval.npz")) as data:
        if "counts" not in data.files:
            raise InputError(f"{bundle_dir}: not a detector bundle (eval.npz has no boxes)")
        boxes, labels, counts = data["boxes"], data["labels"], data["counts"]
    ends = np.cumsum(counts)
    starts = ends - counts
    return [(boxes[a:b], labels[a:b]) for a, b in zip(starts, ends, strict=True)]


def score_bundle(bundle_dir: Path, detections: list) -> dict[str, float | str]:
    """The agent's per-image [[x1, y1, x2, y2, score, label], ...] -> mAP50 / mAP50-95."""
    from edgeopt.tasks.detection import score_detections

    meta = read_meta(bundle_dir)
    targets = bundle_targets(bundle_dir)
    if len(detections) != len(targets):
        raise InputError(f"{bundle_dir}: {len(detections)} detection sets for {len(targets)} eval images")
    predictions = []
    for rows in detections:
        a = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
        predictions.append((a[:, :4], a[:, 4], a[:, 5].astype(np.int64)))
    scores = score_detections(predictions, targets, int(meta["postprocess"]["num_classes"]))
    return {**scores, "metric": "mAP50", "value": scores["accuracy"], "total": len(targets)}
