"""Decode a YOLO-style anchor-free head's raw outputs and run NMS, with numpy only.

Torch-free and edgeopt-free on purpose: the device agent (`edgeopt/profiler/agent.py`) imports
this file from its bundle, so a board with numpy and a runtime decodes its own outputs, and the
host, the pipeline and the tests use the very same code. Hand-written because the libraries
that do this (torchvision's `batched_nms`, ultralytics' `non_max_suppression`) need torch.

Raw layout (see `edgeopt.models.fusion_det`): (B, A, 4 + C) — per anchor 4 raw distances
(left, top, right, bottom) and C class logits; anchors run over the strides' feature maps,
row-major within each level. distance = softplus(raw) * stride from the anchor centre.
"""

from __future__ import annotations

import numpy as np


def anchor_points(img_size: int, strides: list[int] | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres (A, 2) as (x, y) pixels and their strides (A,)."""
    points, stride_of = [], []
    for s in strides:
        n = img_size // s
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32) * s + s / 2)
        stride_of.append(np.full(n * n, s, dtype=np.float32))
    return np.concatenate(points), np.concatenate(stride_of)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # overflow-free


def decode_boxes(raw_box: np.ndarray, points: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """(..., A, 4) raw distances -> (..., A, 4) xyxy pixels."""
    d = softplus(raw_box) * strides[:, None]
    return np.concatenate([points - d[..., :2], points + d[..., 2:]], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, 4) x (K, 4) xyxy -> (M, K) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS; indices of the kept boxes, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        iou = box_iou(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    raw: np.ndarray,
    img_size: int,
    strides: list[int] | tuple[int, ...],
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_det: int = 100,
    pre_nms: int = 1000,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(B, A, 4 + C) raw outputs -> per image (boxes (K, 4) xyxy, scores (K,), labels (K,)).

    Every (anchor, class) pair above `conf_threshold` is a candidate (the best `pre_nms` of them),
    NMS runs per class (boxes offset by class so classes never suppress each other), as in YOLOv8's
    evaluation setting (conf 0.001, IoU 0.6-0.7, max 100-300 detections).
    """
    raw = np.asarray(raw, dtype=np.float32)
    points, stride_of = anchor_points(img_size, strides)
    if raw.ndim != 3 or raw.shape[1] != len(points) or raw.shape[2] < 5:
        raise ValueError(f"raw head outputs must be (B, {len(points)}, 4 + C), got {raw.shape}")
    results = []
    for sample in raw:
        boxes = np.clip(decode_boxes(sample[:, :4], points, stride_of), 0, img_size)
        scores = sigmoid(sample[:, 4:])
        anchor, label = np.nonzero(scores > conf_threshold)
        score = scores[anchor, label]
        if score.size > pre_nms:
            top = np.argpartition(-score, pre_nms)[:pre_nms]
            anchor, label, score = anchor[top], label[top], score[top]
        cand = boxes[anchor]
        keep = nms(cand + label[:, None].astype(np.float32) * (img_size + 1), score, iou_threshold)[:max_det]
        results.append((cand[keep].astype(np.float32), score[keep].astype(np.float32), label[keep].astype(np.int64)))
    return results
