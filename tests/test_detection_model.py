"""The RGB–IR detector: numpy decode/NMS, the TAL loss, export parity (ORT, LiteRT) on boxes and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from detection_fixtures import make_scenes

from edgeopt.evaluate import run_onnx, run_tflite, torch_outputs
from edgeopt.exporters import export
from edgeopt.models import build_model
from edgeopt.tasks.detection_loss import anchor_points, assign, decode, detection_loss
from edgeopt.tasks.yolo_decode import anchor_points as np_anchor_points
from edgeopt.tasks.yolo_decode import box_iou, nms, postprocess

TINY = dict(num_classes=3, img_size=64, depths=(1, 1, 1, 1), dims=(4, 8, 8, 8), neck_width=8, ssm_d_state=4,
            ssm_ratio=1.0, fusion_hidden=4)  # fmt: skip


def _raw_for(box: tuple[float, float, float, float], cls: int, img_size: int = 64, num_classes: int = 3):
    """Raw head outputs with one confident anchor that decodes exactly to `box`."""
    points, strides = np_anchor_points(img_size, (8, 16, 32))
    raw = np.zeros((1, len(points), 4 + num_classes), dtype=np.float32)
    raw[..., :4] = -20.0  # softplus ~ 0: degenerate boxes
    raw[..., 4:] = -10.0
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    a = int(np.argmin(((points - [cx, cy]) ** 2).sum(1) + 1e6 * (strides != 8)))
    d = np.array([points[a, 0] - box[0], points[a, 1] - box[1], box[2] - points[a, 0], box[3] - points[a, 1]])
    raw[0, a, :4] = np.log(np.expm1(d / strides[a]))  # inverse softplus
    raw[0, a, 4 + cls] = 5.0
    return raw, a


def test_postprocess_decodes_the_encoded_box_and_class():
    raw, _ = _raw_for((10.0, 12.0, 30.0, 26.0), cls=2)
    (boxes, scores, labels), = postprocess(raw, 64, (8, 16, 32), conf_threshold=0.5)
    assert boxes.shape == (1, 4) and labels.tolist() == [2]
    np.testing.assert_allclose(boxes[0], [10.0, 12.0, 30.0, 26.0], atol=1e-3)
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)


def test_nms_keeps_the_best_of_overlapping_boxes_and_other_classes_untouched():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], dtype=np.float32)
    assert nms(boxes[:3], scores[:3], 0.5).tolist() == [0, 2]  # IoU(0, 1) = 81/119 > 0.5
    assert nms(boxes[:3], scores[:3], 0.7).tolist() == [0, 1, 2]
    # class-aware NMS in postprocess: an identical box of another class survives
    raw_a, a = _raw_for((10.0, 12.0, 30.0, 26.0), cls=0)
    raw_a[0, a, 4 + 1] = 4.0
    (b, s, lab), = postprocess(raw_a, 64, (8, 16, 32), conf_threshold=0.5)
    assert sorted(lab.tolist()) == [0, 1] and np.allclose(b[0], b[1])
    assert box_iou(b[:1], b[1:])[0, 0] == pytest.approx(1.0)


def test_numpy_and_torch_decoders_agree():
    points, strides = anchor_points(64, (8, 16, 32))
    np_points, np_strides = np_anchor_points(64, (8, 16, 32))
    np.testing.assert_array_equal(points.numpy(), np_points)
    raw = torch.randn(84, 4)
    from edgeopt.tasks.yolo_decode import decode_boxes

    np.testing.assert_allclose(decode(raw, points, strides).numpy(), decode_boxes(raw.numpy(), np_points, np_strides),
                               rtol=1e-5, atol=1e-4)  # fmt: skip


def test_assignment_picks_anchors_inside_the_box_even_for_a_tiny_box():
    points, strides = anchor_points(64, (8, 16, 32))
    pred = decode(torch.zeros(len(points), 4), points, strides)
    scores = torch.full((len(points), 3), 0.01)
    gt = torch.tensor([[8.0, 8.0, 40.0, 30.0], [50.0, 50.0, 53.0, 53.0]])  # the second holds no anchor centre
    fg, matched, targets = assign(pred, scores, points, gt, torch.tensor([1, 2]))
    assert fg.sum() >= 2
    for i in fg.nonzero().squeeze(1):
        box = gt[matched[i]]
        if matched[i] == 0:
            assert box[0] < points[i, 0] < box[2] and box[1] < points[i, 1] < box[3]
        assert targets[i].argmax() == torch.tensor([1, 2])[matched[i]]
    assert (matched[fg] == 1).any()  # the tiny box still gets its nearest anchor


def test_training_steps_lower_the_detection_loss():
    torch.manual_seed(0)
    model = build_model("fusion-vmamba-det", TINY).train()
    images, boxes, labels = make_scenes(8, 64, seed=1)
    x = torch.from_numpy(images).float() / 255
    targets = [(torch.from_numpy(b), torch.from_numpy(lab)) for b, lab in zip(boxes, labels, strict=True)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = detection_loss(model(x), targets, 64, (8, 16, 32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_export_parity_on_raw_outputs_boxes_and_scores(fmt: str, tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("fusion-vmamba-det", TINY).eval()
    images, _, _ = make_scenes(3, 64, seed=2)
    x = images.astype(np.float32) / 255
    path = export(fmt, model, torch.from_numpy(x[:2]), tmp_path / f"det.{'onnx' if fmt == 'onnx' else 'tflite'}")
    ref = torch_outputs(model, x)
    got = run_onnx(path, x) if fmt == "onnx" else run_tflite(path, x)
    assert got.shape == ref.shape == (3, 84, 7)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    points, strides = np_anchor_points(64, (8, 16, 32))
    from edgeopt.tasks.yolo_decode import decode_boxes, sigmoid

    np.testing.assert_allclose(decode_boxes(got[..., :4], points, strides), decode_boxes(ref[..., :4], points, strides),
                               atol=1e-3)  # pixels  # fmt: skip
    np.testing.assert_allclose(sigmoid(got[..., 4:]), sigmoid(ref[..., 4:]), atol=1e-5)
