"""The RGB–IR detection datasets: `rgbt` (a local set: LLVIP, YOLO-txt pairs or COCO json) and `rgbt-synthetic`.

Pairs and boxes come from `edgeopt.data.rgbt_layouts`; here the pixels are decoded
(RGB as 3 channels, IR as 1), stacked into one (4, size, size) uint8 image and
letterboxed (see `edgeopt.data.detection`). Calibration images are a seeded share of
the train split unless the set has its own `calib` split; the eval split is `val`,
else `test`, unless named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeopt.data import DATASETS
from edgeopt.data.detection import BANDS, DetectionSplit, DetectionSplits, letterbox
from edgeopt.data.rgbt_layouts import Sample, scan
from edgeopt.errors import InputError


def _ir_gray(ir) -> np.ndarray:
    """IR as (H, W) uint8; 16-bit / float thermal frames are stretched between their 1st and 99th percentiles."""
    if ir.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raw = np.asarray(ir, dtype=np.float32)
        lo, hi = np.percentile(raw, [1, 99])
        return (np.clip((raw - lo) / max(hi - lo, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.asarray(ir.convert("L"))


def read_pair(sample: Sample) -> np.ndarray:
    """(H, W, 4) uint8: RGB then IR (IR stored as 3 grey channels is read as one)."""
    from PIL import Image

    with Image.open(sample.rgb) as rgb, Image.open(sample.ir) as ir:
        return np.concatenate([np.asarray(rgb.convert("RGB")), _ir_gray(ir)[:, :, None]], axis=2)


def load_split(samples: list[Sample], size: int) -> DetectionSplit:
    images = torch.empty((len(samples), 4, size, size), dtype=torch.uint8)
    boxes, labels, names, scales = [], [], [], []
    for i, sample in enumerate(samples):
        image, scale = letterbox(read_pair(sample), size)
        images[i] = torch.from_numpy(image.transpose(2, 0, 1).copy())
        boxes.append((sample.boxes * scale).astype(np.float32))
        labels.append(sample.labels)
        names.append(sample.stem)
        scales.append(scale)
    return DetectionSplit(images, boxes, labels, names, scales)


@DATASETS.register("rgbt")
def rgbt(
    path: str | Path,
    layout: str = "auto",
    size: int = 256,
    label_source: str = "ir",
    train_split: str = "train",
    eval_split: str | None = None,
    calib_split: str | None = None,
    calib_fraction: float = 0.1,
    seed: int = 0,
    class_names: list[str] | None = None,
    bands: str = "rgbt",
) -> DetectionSplits:
    """Load a local RGB–IR set; every file is checked before any pixel is decoded."""
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if not 0 <= calib_fraction < 1:
        raise ValueError(f"calib_fraction must be in [0, 1), got {calib_fraction}")
    found = scan(Path(path).expanduser(), layout, label_source, class_names)
    splits = found.samples
    if eval_split is None:
        eval_split = next((s for s in ("val", "test", "eval") if s in splits), None)
    if eval_split not in splits or not splits[eval_split]:
        raise InputError(f"{path}: no eval split (found: {', '.join(sorted(splits)) or 'none'}); name one with eval_split")
    train = list(splits.get(train_split, []))
    if calib_split is None and "calib" in splits:
        calib_split = "calib"
    if calib_split is not None:
        if calib_split not in splits:
            raise InputError(f"{path}: no split '{calib_split}' (found: {', '.join(sorted(splits))})")
        calib = splits[calib_split]
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        n_calib = round(len(train) * calib_fraction)
        calib = [train[i] for i in sorted(order[:n_calib])]
        train = [train[i] for i in sorted(order[n_calib:])]
    return DetectionSplits(
        load_split(train, size), load_split(calib, size), load_split(splits[eval_split], size), found.class_names
    ).with_bands(bands)


@DATASETS.register("rgbt-synthetic")
def rgbt_synthetic(
    size: int = 256,
    n_train: int = 2000,
    n_calib: int = 128,
    n_eval: int = 400,
    seed: int = 0,
    bands: str = "rgbt",
    cache: bool = True,
) -> DetectionSplits:
    """The seeded synthetic RGB–IR set where fusion matters (edgeopt.data.synthetic_rgbt); bands="rgb"|"ir" zeroes the other band."""
    # Imported here so `python -m edgeopt.data.synthetic_rgbt` runs a module the package has not imported.
    from edgeopt.data.synthetic_rgbt import synthetic_splits

    if bands not in BANDS:
        raise ValueError(f"bands must be one of {', '.join(BANDS)}, got '{bands}'")
    return synthetic_splits(size, n_train, n_calib, n_eval, seed, cache).with_bands(bands)
