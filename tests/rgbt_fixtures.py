"""Tiny RGB–IR sets written in each public layout (LLVIP, YOLO-txt pairs, COCO json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CLASSES = ["person", "car"]
W, H = 80, 64  # not square: loading letterboxes


@dataclass
class Pair:
    split: str
    stem: str
    rgb: np.ndarray  # (H, W, 3) uint8
    ir: np.ndarray  # (H, W) uint8
    boxes: np.ndarray  # (M, 4) xyxy pixels, integers
    labels: np.ndarray  # (M,)


def make_pairs() -> list[Pair]:
    """Two train pairs, two test pairs; one test image has no objects."""
    rng = np.random.default_rng(0)
    layout = {
        ("train", "a001"): ([[4, 6, 20, 40], [30, 10, 70, 30]], [0, 1]),
        ("train", "a002"): ([[50, 20, 78, 60]], [1]),
        ("test", "b001"): ([[0, 0, 16, 32], [40, 30, 80, 64]], [0, 0]),
        ("test", "b002"): ([], []),
    }
    pairs = []
    for (split, stem), (boxes, labels) in layout.items():
        pairs.append(Pair(
            split, stem,
            rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            rng.integers(0, 256, (H, W), dtype=np.uint8),
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64),
        ))
    return pairs


def _save(rgb: np.ndarray, ir: np.ndarray, rgb_path: Path, ir_path: Path) -> None:
    rgb_path.parent.mkdir(parents=True, exist_ok=True)
    ir_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(rgb_path)
    Image.fromarray(np.repeat(ir[:, :, None], 3, axis=2)).save(ir_path)  # IR stored as grey RGB, like LLVIP


def write_llvip(root: Path, pairs: list[Pair]) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for p in pairs:
        _save(p.rgb, p.ir, root / "visible" / p.split / f"{p.stem}.jpg", root / "infrared" / p.split / f"{p.stem}.jpg")
        objects = "".join(
            f"<object><name>{CLASSES[c]}</name><bndbox><xmin>{int(b[0])}</xmin><ymin>{int(b[1])}</ymin>"
            f"<xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
            for b, c in zip(p.boxes, p.labels, strict=True)
        )
        (root / "Annotations" / f"{p.stem}.xml").write_text(
            f"<annotation><filename>{p.stem}.jpg</filename><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size>{objects}</annotation>"
        )
    return root


def write_yolo(root: Path, pairs: list[Pair], rgb_dir: str = "images", ir_dir: str = "imagesIR") -> Path:
    for p in pairs:
        _save(p.rgb, p.ir, root / rgb_dir / p.split / f"{p.stem}.png", root / ir_dir / p.split / f"{p.stem}.png")
        (root / "labels" / p.split).mkdir(parents=True, exist_ok=True)
        lines = [
            f"{c} {(b[0] + b[2]) / 2 / W:.6f} {(b[1] + b[3]) / 2 / H:.6f} {(b[2] - b[0]) / W:.6f} {(b[3] - b[1]) / H:.6f}\n"
            for b, c in zip(p.boxes, p.labels, strict=True)
        ]
        (root / "labels" / p.split / f"{p.stem}.txt").write_text("".join(lines))
    data = {"path": ".", "train": f"{rgb_dir}/train", "test": f"{rgb_dir}/test", "names": dict(enumerate(CLASSES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


def write_coco(root: Path, pairs: list[Pair]) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in sorted({p.split for p in pairs}):
        images, annotations = [], []
        for i, p in enumerate(q for q in pairs if q.split == split):
            _save(p.rgb, p.ir, root / "visible" / split / f"{p.stem}.png", root / "infrared" / split / f"{p.stem}.png")
            images.append({"id": i + 10, "file_name": f"{p.stem}.png", "width": W, "height": H})
            for b, c in zip(p.boxes, p.labels, strict=True):
                x1, y1, x2, y2 = (float(v) for v in b)
                annotations.append({"id": len(annotations) + 1, "image_id": i + 10, "category_id": int(c) + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
        (root / "annotations" / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
    return root
