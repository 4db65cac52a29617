"""scikit-learn's handwritten digits (1,797 real 8×8 scans), shipped inside the package.

Fixed stratified split (seed 0): 60% train, 10% calibration, 30% eval.
`size` > 8 upsamples bilinearly (e.g. 32 for the VMamba demo); `flatten`
gives (N, size·size) vectors for MLPs, otherwise (N, 1, size, size) images.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from edgeopt.data import DATASETS, Split, Splits


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _split_indices(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=0.6, stratify=y, random_state=seed)
    calib, evl = train_test_split(rest, train_size=0.25, stratify=y[rest], random_state=seed)
    return train, calib, evl


@DATASETS.register("digits")
def digits(size: int = 8, flatten: bool = False, seed: int = 0) -> Splits:
    images, labels = _raw()
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    if flatten:
        x = x.flatten(1)
    y = torch.from_numpy(labels)
    parts = [Split(x[i].contiguous(), y[i]) for i in _split_indices(labels, seed)]
    return Splits(*parts, num_classes=10)
