"""Paired RGB–IR detection data: the split types every detection loader returns.

An image is one (4, H, W) uint8 tensor — channels 0-2 RGB, channel 3 IR — so
pixel-level fusion is the model's first layer and a single-band ablation is the
same architecture with the other band zeroed (`with_bands`). Boxes are x1 y1 x2 y2
in pixels of the stored (resized) image.

Resizing is a top-left letterbox: the longer side becomes `size`, the aspect ratio
is kept, the right/bottom padding is grey (114, as YOLO pads). Boxes are therefore
scaled by one factor and never shifted; `DetectionSplit.scales` maps them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

BANDS = ("rgbt", "rgb", "ir")
PAD_VALUE = 114


@dataclass(frozen=True)
class DetectionSplit:
    images: torch.Tensor  # (N, 4, H, W) uint8: RGB then IR
    boxes: list[np.ndarray]  # per image (M, 4) float32 xyxy pixels
    labels: list[np.ndarray]  # per image (M,) int64
    names: list[str]  # image id / file stem
    scales: list[float] = field(default_factory=list)  # resized / original pixels (1.0 when not resized)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if not (len(self.boxes) == len(self.labels) == len(self.names) == n):
            raise ValueError(
                f"split has {n} images but {len(self.boxes)} box sets, {len(self.labels)} label sets, {len(self.names)} names"
            )
        if not self.scales:
            object.__setattr__(self, "scales", [1.0] * n)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: list[int] | np.ndarray | range) -> DetectionSplit:
        """The images at `index`, in that order (for mini-batches and quick runs)."""
        index = [int(i) for i in index]
        return DetectionSplit(
            self.images[index],
            [self.boxes[i] for i in index],
            [self.labels[i] for i in index],
            [self.names[i] for i in index],
            [self.scales[i] for i in index],
        )

    def with_bands(self, bands: str) -> DetectionSplit:
        """The same split with the unused band zeroed ("rgb": IR = 0, "ir": RGB = 0)."""
        if bands not in BANDS:
            raise ValueError(f"bands must be one of {', '.join(BANDS)}, got '{bands}'")
        if bands == "rgbt":
            return self
        images = self.images.clone()
        if bands == "rgb":
            images[:, 3] = 0
        else:
            images[:, :3] = 0
        return replace(self, images=images)

    def num_objects(self) -> int:
        return int(sum(len(b) for b in self.boxes))


@dataclass(frozen=True)
class DetectionSplits:
    train: DetectionSplit
    calib: DetectionSplit
    eval: DetectionSplit
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_bands(self, bands: str) -> DetectionSplits:
        return replace(
            self,
            train=self.train.with_bands(bands),
            calib=self.calib.with_bands(bands),
            eval=self.eval.with_bands(bands),
        )


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize (H, W, C) uint8 so the longer side is `size`, pad right/bottom; returns (image, scale).

    Uses pillow's bilinear resize per channel group (pillow has no 4-channel non-RGBA mode).
    """
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.full((size, size, image.shape[2]), PAD_VALUE, dtype=np.uint8)
    if (nh, nw) == (h, w):
        out[:h, :w] = image
        return out, 1.0
    for c in range(image.shape[2]):
        channel = Image.fromarray(image[:, :, c]).resize((nw, nh), Image.Resampling.BILINEAR)
        out[:nh, :nw, c] = np.asarray(channel)
    return out, scale
