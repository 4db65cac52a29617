"""The detector's training loss: task-aligned assignment (TAL, YOLOv8's) + BCE + GIoU + L1.

Assignment, per image: candidate anchors are those whose centre lies inside a ground-truth box
(a box too small to hold any centre gets its nearest anchor). Each candidate gets the alignment
metric t = s^0.5 * IoU^6 (s: predicted probability of the box's class, IoU: predicted box vs
the ground truth); the 10 best candidates of each box are its positives, an anchor claimed by two
boxes goes to the one it overlaps most. Class targets are t normalized so that each box's best
anchor gets that anchor's IoU (scores learn to rank by localization quality, which is what mAP
rewards). Loss = w_cls BCE(all anchors) + w_iou (1 - GIoU) + w_l1 |distances| on positives,
all weighted by the targets and normalized by their sum. Kept to one file and plain torch ops:
ultralytics' implementation is AGPL and tied to its trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOPK, ALPHA, BETA = 10, 0.5, 6.0
W_CLS, W_IOU, W_L1 = 1.0, 2.5, 0.5


def anchor_points(img_size: int, strides: tuple[int, ...] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres (A, 2) as (x, y) pixels and strides (A,) — the torch twin of yolo_decode's."""
    points, stride_of = [], []
    for s in strides:
        n = img_size // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], 1).float() * s + s / 2)
        stride_of.append(torch.full((n * n,), float(s)))
    return torch.cat(points), torch.cat(stride_of)


def decode(raw_box: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    d = F.softplus(raw_box) * strides[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise generalized IoU of (K, 4) xyxy pairs."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[:, 2:] - a[:, :2]).prod(-1) + (b[:, 2:] - b[:, :2]).prod(-1) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1)
    iou = inter / union.clamp(min=1e-9)
    return iou - (hull - union) / hull.clamp(min=1e-9)


@torch.no_grad()
def assign(
    pred_boxes: torch.Tensor, pred_scores: torch.Tensor, points: torch.Tensor, gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: (positive mask (A,), matched gt index (A,), class targets (A, C))."""
    num_anchors, num_classes = pred_scores.shape
    if len(gt_boxes) == 0:
        return (torch.zeros(num_anchors, dtype=torch.bool), torch.zeros(num_anchors, dtype=torch.long),
                torch.zeros(num_anchors, num_classes))  # fmt: skip
    inside = ((points[None] > gt_boxes[:, None, :2]) & (points[None] < gt_boxes[:, None, 2:])).all(-1)  # (M, A)
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(centres, points)  # (M, A)
    empty = ~inside.any(1)
    if empty.any():
        inside[empty, dist[empty].argmin(1)] = True
    iou = box_iou(gt_boxes, pred_boxes).clamp(min=0)  # (M, A)
    score = pred_scores[:, gt_labels].T  # (M, A)
    align = score.pow(ALPHA) * iou.pow(BETA) * inside
    # ties (early training: every metric ~0) go to the anchors nearest the centre
    ranking = align + 1e-9 * inside / (1.0 + dist)
    top = ranking.topk(min(TOPK, num_anchors), dim=1).indices
    pos = torch.zeros_like(inside)
    pos.scatter_(1, top, True)
    pos &= inside
    many = pos.sum(0) > 1  # an anchor claimed by several boxes goes to the best-overlapping one
    if many.any():
        best = iou.argmax(0)
        pos[:, many] = False
        pos[best[many], many.nonzero().squeeze(1)] = True
    fg = pos.any(0)
    matched = pos.float().argmax(0)
    align = align * pos
    norm = align / align.amax(1, keepdim=True).clamp(min=1e-9) * (iou * pos).amax(1, keepdim=True)
    quality = norm.amax(0)  # (A,)
    targets = torch.zeros(num_anchors, num_classes)
    targets[fg, gt_labels[matched[fg]]] = quality[fg]
    return fg, matched, targets


def detection_loss(
    raw: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], img_size: int, strides: tuple[int, ...]
) -> torch.Tensor:
    """Mean over the batch of the TAL loss; `targets` per image (boxes (M, 4) xyxy px, labels (M,))."""
    points, stride_of = anchor_points(img_size, strides)
    raw = raw.float()
    boxes = decode(raw[..., :4], points, stride_of)
    logits = raw[..., 4:]
    cls_target = torch.zeros_like(logits)
    iou_terms, l1_terms, norm = [], [], logits.new_zeros(())
    for b, (gt_boxes, gt_labels) in enumerate(targets):
        fg, matched, t = assign(boxes[b].detach(), logits[b].detach().sigmoid(), points, gt_boxes.float(), gt_labels)
        cls_target[b] = t
        norm = norm + t.sum()
        if fg.any():
            weight = t[fg].sum(-1)
            gt = gt_boxes.float()[matched[fg]]
            iou_terms.append(((1.0 - giou(boxes[b, fg], gt)) * weight).sum())
            p, s = points[fg], stride_of[fg, None]
            gt_dist = torch.cat([p - gt[:, :2], gt[:, 2:] - p], dim=1) / s
            pred_dist = F.softplus(raw[b, fg, :4])
            l1_terms.append(((pred_dist - gt_dist).abs().sum(-1) * weight).sum())
    norm = norm.clamp(min=1.0)
    loss = W_CLS * F.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum") / norm
    if iou_terms:
        loss = loss + W_IOU * torch.stack(iou_terms).sum() / norm + W_L1 * torch.stack(l1_terms).sum() / norm
    return loss
