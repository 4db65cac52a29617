"""`python -m edgeopt.data.digits_png DIR`: scikit-learn's digits written as 8-bit PNGs in the
image-folder layout (train/calib/val, the `digits` dataset's own split), a real image folder to
try the `imagefolder` dataset on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_digits(root: Path) -> Path:
    from PIL import Image

    from edgeopt.data.digits import _raw, _split_indices

    images, labels = _raw()
    for split, indices in zip(("train", "calib", "val"), _split_indices(labels, 0), strict=True):
        for i in indices:
            folder = Path(root) / split / f"digit-{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(images[i] * 255).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return Path(root)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edgeopt.data.digits_png DIR")
    print(f"wrote {write_digits(Path(sys.argv[1]))}")
