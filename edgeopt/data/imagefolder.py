"""Classification data from an image-folder layout (torchvision's ImageFolder convention):

    <path>/train/<class>/*.png    training images, one folder per class
    <path>/val/<class>/*.png      evaluation images (accuracy is reported on these)
    <path>/calib/<class>/*.png    optional; otherwise `calib_fraction` of train, held out per class

Class indices follow the sorted names of the train folders. Pixels are scaled to [0, 1], then
normalized with `mean` and `std` (one number, or one per channel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeopt.data import DATASETS, Split, Splits
from edgeopt.data.images import image_files, read_image
from edgeopt.errors import InputError


@DATASETS.register("imagefolder")
def imagefolder(path: str, size: int = 32, channels: int = 3, mean: float | list[float] = 0.5,
                std: float | list[float] = 0.5, calib_fraction: float = 0.1, flatten: bool = False,
                seed: int = 0) -> Splits:  # fmt: skip
    root = Path(path).expanduser()
    if not (root / "train").is_dir():
        raise InputError(f"imagefolder: {root / 'train'} not found (expected {root}/train/<class>/*.png and val/)")
    if not (root / "val").is_dir():
        raise InputError(f"imagefolder: {root / 'val'} not found (expected {root}/val/<class>/*.png)")
    if not 0 < calib_fraction < 1:
        raise InputError(f"imagefolder: calib_fraction must be in (0, 1), got {calib_fraction}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"imagefolder: no class folders in {root / 'train'}")

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        folders = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise InputError(f"imagefolder: {root / split} has classes not in train: {', '.join(unknown[:5])}")
        images, labels = [], []
        for label, name in enumerate(classes):
            if (root / split / name).is_dir():
                files = image_files(root / split / name)
                images += [read_image(f, size, channels) for f in files]
                labels += [label] * len(files)
        if not images:
            raise InputError(f"imagefolder: no images in {root / split}")
        return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)

    train_x, train_y = load("train")
    eval_x, eval_y = load("val")
    if (root / "calib").is_dir():
        calib_x, calib_y = load("calib")
    else:
        calib = _held_out(train_y, calib_fraction, seed)
        calib_x, calib_y = train_x[calib], train_y[calib]
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[calib] = False
        train_x, train_y = train_x[keep], train_y[keep]
    shift = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def split(x: torch.Tensor, y: torch.Tensor) -> Split:
        x = (x - shift) / scale
        return Split((x.flatten(1) if flatten else x).contiguous(), y)

    return Splits(split(train_x, train_y), split(calib_x, calib_y), split(eval_x, eval_y), num_classes=len(classes))


def _held_out(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded, per-class `fraction` of the samples (at least one of each class that has two)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values

