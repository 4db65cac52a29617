"""An on-disk cache of decoded detection splits (.npz), so a set is decoded or generated once.

Files live under `$EDGEOPT_CACHE` (default `~/.cache/edgeopt`), named by a key the caller
derives from everything the splits depend on; writes go to a temp file renamed into place,
and a damaged file reads as a miss.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeopt.data.detection import DetectionSplit


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_CACHE", Path.home() / ".cache" / "edgeopt"))


def save_splits(path: Path, splits: dict[str, DetectionSplit]) -> None:
    arrays = {}
    for name, s in splits.items():
        arrays[f"{name}_images"] = s.images.numpy()
        arrays[f"{name}_boxes"] = np.concatenate(s.boxes) if s.boxes else np.zeros((0, 4), np.float32)
        arrays[f"{name}_labels"] = np.concatenate(s.labels) if s.labels else np.zeros((0,), np.int64)
        arrays[f"{name}_counts"] = np.asarray([len(b) for b in s.boxes], dtype=np.int64)
        arrays[f"{name}_names"] = np.asarray(s.names, dtype=str)
        arrays[f"{name}_scales"] = np.asarray(s.scales, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_splits(path: Path, names: list[str]) -> dict[str, DetectionSplit] | None:
    """The cached splits, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in names:
                counts = z[f"{name}_counts"]
                cuts = np.cumsum(counts)[:-1]
                out[name] = DetectionSplit(
                    torch.from_numpy(z[f"{name}_images"]),
                    np.split(z[f"{name}_boxes"], cuts) if len(counts) else [],
                    np.split(z[f"{name}_labels"], cuts) if len(counts) else [],
                    [str(s) for s in z[f"{name}_names"]],
                    [float(s) for s in z[f"{name}_scales"]],
                )
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return out
