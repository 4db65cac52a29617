"""A tiny, fast stand-in RGB–IR detection set for tests (the real one is `rgbt-synthetic`).

Shapes follow `edgeopt.data.detection`: images (N, 4, H, W) uint8 (RGB + IR), boxes per image
(M, 4) float32 xyxy pixels, labels (M,) int64. Classes differ by shape (wide / square / tall).
"""

from __future__ import annotations

import numpy as np

SHAPES = ((0.30, 0.12), (0.16, 0.16), (0.07, 0.18))  # (w, h) as a share of the image


def make_scenes(n: int, size: int = 64, seed: int = 0, max_objects: int = 3):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 4, size, size), dtype=np.uint8)
    boxes, labels = [], []
    for i in range(n):
        img = rng.normal(60, 12, (4, size, size))
        k = int(rng.integers(0, max_objects + 1))
        b, lab = [], []
        for _ in range(k):
            c = int(rng.integers(0, len(SHAPES)))
            w, h = (int(v * size * rng.uniform(0.8, 1.2)) for v in SHAPES[c])
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            img[:3, y0 : y0 + h, x0 : x0 + w] = rng.uniform(140, 230, (3, 1, 1))
            img[3, y0 : y0 + h, x0 : x0 + w] = rng.uniform(170, 250)
            b.append([x0, y0, x0 + w, y0 + h])
            lab.append(c)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        boxes.append(np.asarray(b, dtype=np.float32).reshape(-1, 4))
        labels.append(np.asarray(lab, dtype=np.int64))
    return images, boxes, labels
