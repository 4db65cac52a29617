"""COCO mAP through pycocotools: perfect, shifted, half-missed and low-scored predictions give known values."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.metrics import coco_map


def _targets(n_images: int = 4):
    """Each image: one class-0 and one class-1 object, 40x40 px."""
    boxes = np.asarray([[10, 10, 50, 50], [100, 60, 140, 100]], np.float32)
    return [(boxes + 3 * i, np.asarray([0, 1])) for i in range(n_images)]


def _perfect(targets):
    return [(b.copy(), np.full(len(b), 0.9), lab.copy()) for b, lab in targets]


def test_perfect_predictions_score_one(capsys):
    result = coco_map(_perfect(_targets()), _targets(), num_classes=3)
    assert result == {"map50": pytest.approx(1.0), "map50_95": pytest.approx(1.0)}
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_boxes_shifted_to_iou_0_4_score_zero_at_50():
    # A 40x40 box shifted right by s overlaps (40 - s) * 40; IoU = (40 - s) / (40 + s) = 0.4 at s = 120/7.
    shift = 120 / 7
    preds = [(b + np.asarray([shift, 0, shift, 0], np.float32), s, lab) for b, s, lab in _perfect(_targets())]
    assert coco_map(preds, _targets(), 3) == {"map50": 0.0, "map50_95": 0.0}


def test_boxes_shifted_to_iou_0_63_match_three_of_ten_thresholds():
    # IoU = (40 - 9) / (40 + 9) = 0.633: a match at IoU thresholds 0.50, 0.55, 0.60 of the ten -> 3/10.
    shift = 9.0
    preds = [(b + np.asarray([shift, 0, shift, 0], np.float32), s, lab) for b, s, lab in _perfect(_targets())]
    result = coco_map(preds, _targets(), 3)
    assert result == {"map50": pytest.approx(1.0), "map50_95": pytest.approx(0.3)}


def test_half_of_each_class_missed_gives_51_of_101():
    targets = _targets(4)
    preds = _perfect(targets)
    preds = [p if i % 2 == 0 else (np.zeros((0, 4)), np.zeros(0), np.zeros(0)) for i, p in enumerate(preds)]
    # Recall reaches 0.5 at precision 1: 101-point interpolation keeps points 0.00..0.50 -> 51/101.
    result = coco_map(preds, targets, 3)
    assert result["map50"] == pytest.approx(51 / 101)


def test_a_false_positive_ranked_first_halves_precision_at_low_recall():
    targets = _targets(1)
    boxes, scores, labels = _perfect(targets)[0]
    # One class-0 detection far from any object, scored above the true one.
    preds = [(np.vstack([boxes, [[200, 200, 240, 240]]]), np.asarray([0.5, 0.5, 0.99]), np.asarray([0, 1, 0]))]
    result = coco_map(preds, targets, 2)
    # class 0: FP then TP -> precision 0.5 at recall 1 -> AP 0.5; class 1: AP 1 -> mean 0.75.
    assert result["map50"] == pytest.approx(0.75)


def test_classes_without_ground_truth_are_left_out_and_bad_input_rejected():
    targets = _targets(2)
    assert coco_map(_perfect(targets), targets, num_classes=10)["map50"] == pytest.approx(1.0)
    assert coco_map([(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * 2, targets, 3) == {"map50": 0.0, "map50_95": 0.0}
    with pytest.raises(ValueError, match="predictions for"):
        coco_map(_perfect(targets)[:1], targets, 3)
    with pytest.raises(ValueError, match="ground-truth"):
        coco_map([(np.zeros((0, 4)), np.zeros(0), np.zeros(0))], [(np.zeros((0, 4)), np.zeros(0))], 3)
