"""A seeded synthetic RGB–IR detection set in which fusion must matter.

No public RGB–IR set may be downloaded or redistributed here, so this script draws
one. Each scene has 2–8 objects of three classes told apart by shape, size and
texture — vessel (long hull, pointed bow, hot stern), vehicle (rectangle, dark
windshield, hot engine end), person (small, upright, head on a body, warm all over) —
on a textured background with clutter in each band (coloured rocks/roofs with no heat,
warm blobs with no shape). Per image one condition decides which band carries the
objects:

- normal (30%): both bands clear; some vessels/vehicles are parked cold (IR faint);
- night (25%): RGB dark and noisy, IR clear;
- haze (20%): RGB washed out to low contrast, IR clear;
- crossover (25%): thermal crossover, objects at background temperature in IR, RGB clear.

So an RGB-only model loses night and haze scenes, an IR-only model loses crossover
scenes and cold objects, and only a fused model sees everything. Image names end in
the condition (`train_00012_night`) for per-condition analysis.

Every image is drawn from its own generator seeded by (seed, split, index), so a
split does not change when another split's size does. Generated sets are cached as
.npz under `$EDGEOPT_CACHE` (default `~/.cache/edgeopt`), keyed by the generator
version and the arguments. `python -m edgeopt.data.synthetic_rgbt --out DIR` writes a
set in the YOLO-txt pair layout (`images/ imagesIR/ labels/ data.yaml`) to look at.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeopt.data.detection import DetectionSplit, DetectionSplits

GENERATOR_VERSION = 2  # bump whenever a scene changes: the cache is keyed by it
CLASS_NAMES = ["vessel", "vehicle", "person"]
CONDITIONS = ("normal", "night", "haze", "crossover")
CONDITION_P = (0.30, 0.25, 0.20, 0.25)
SPLIT_IDS = {"train": 0, "calib": 1, "eval": 2}
# Object extents (pixels at 256²; scaled with `size`): (min, max) of the long side.
LENGTHS = {0: (22, 64), 1: (12, 36), 2: (10, 28)}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_CACHE", Path.home() / ".cache" / "edgeopt"))


def _lowfreq(rng: np.random.Generator, channels: int, size: int, grid: int = 6) -> np.ndarray:
    """Smooth random fields in [0, 1]: a (grid × grid) random lattice, bilinearly upsampled."""
    pos = np.linspace(0, grid - 1, size, dtype=np.float32)
    lo = np.minimum(pos.astype(np.int64), grid - 2)
    frac = pos - lo
    interp = np.zeros((size, grid), dtype=np.float32)
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    lattice = rng.random((channels, grid, grid), dtype=np.float32)
    return interp @ lattice @ interp.T


def _shape(cls: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One object in canonical orientation: (mask (h, w), rgb (3, h, w), heat (h, w) in [0, 1.6])."""
    if cls == 0:  # vessel: hull with a pointed bow at +u, superstructure mid-ship, hot stern
        h, w = max(5, round(length * rng.uniform(0.24, 0.36))), length
    elif cls == 1:  # vehicle: rectangle, dark windshield near the front, hot engine at the front
        h, w = max(5, round(length * rng.uniform(0.45, 0.6))), length
    else:  # person, upright: head above a body
        h, w = length, max(4, round(length * rng.uniform(0.32, 0.45)))
    v, u = np.meshgrid(
        (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1, (np.arange(w, dtype=np.float32) + 0.5) / w, indexing="ij"
    )
    rgb = np.empty((3, h, w), dtype=np.float32)
    if cls == 0:
        mask = np.abs(v) <= np.clip((1 - u) / 0.3, 0, 1)
        hull = rng.uniform(0.7, 0.95) * np.array([1.0, 1.0, rng.uniform(0.9, 1.05)], dtype=np.float32)
        rgb[:] = hull[:, None, None]
        deck = (u > 0.3) & (u < 0.6) & (np.abs(v) < 0.5)
        rgb[:, deck] = rng.uniform(0.15, 0.35)
        heat = np.where(u < 0.2, 1.5, 0.8).astype(np.float32)
    elif cls == 1:
        mask = np.ones((h, w), dtype=bool)
        body = rng.uniform(0.05, 1.0, 3).astype(np.float32)
        body[rng.integers(3)] = rng.uniform(0.6, 1.0)  # a saturated paint colour
        rgb[:] = body[:, None, None]
        rgb[:, (u > 0.6) & (u < 0.75) & (np.abs(v) < 0.8)] = 0.08
        heat = np.where(u > 0.75, 1.5, 0.8).astype(np.float32)
    else:
        head_r = 0.2
        yy = (v + 1) / 2  # 0 at the top
        head = (yy - head_r) ** 2 / head_r**2 + ((u - 0.5) / 0.45) ** 2 <= 1
        body = (yy > 0.3) & (np.abs(u - 0.5) <= 0.5 - 0.2 * np.clip((0.5 - yy) / 0.2, 0, 1))
        mask = head | body
        rgb[:] = rng.uniform(0.05, 1.0, 3).astype(np.float32)[:, None, None]
        rgb[:, head] = np.array([0.85, 0.65, 0.5], dtype=np.float32)[:, None] * rng.uniform(0.5, 1.1)
        heat = np.where(head, 1.3, 1.0).astype(np.float32)
    rgb += rng.normal(0, 0.03, rgb.shape).astype(np.float32)
    return mask, rgb, heat


def _place(size: int, h: int, w: int, taken: list[tuple[int, int, int, int]], rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner where an h×w box stays inside the image and 2 px clear of the others."""
    for _ in range(30):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        if all(x + w + 2 <= a or a2 + 2 <= x or y + h + 2 <= b or b2 + 2 <= y for a, b, a2, b2 in taken):
            return y, x
    return None


def noise_bank(size: int, seed: int) -> np.ndarray:
    """Unit Gaussian noise (4, 2·size, 2·size) that scenes crop at random offsets.

    Drawing fresh Gaussian noise for every pixel is most of a scene's cost; a random
    crop of one shared bank per split is as good for a detector and keeps generation fast.
    """
    return np.random.default_rng([seed, 99]).standard_normal((4, 2 * size, 2 * size), dtype=np.float32)


def _noise(rng: np.random.Generator, bank: np.ndarray, size: int) -> np.ndarray:
    oy, ox = rng.integers(0, bank.shape[1] - size + 1, 2)
    order = rng.permutation(4)
    return bank[order, oy : oy + size, ox : ox + size]


def render_scene(
    rng: np.random.Generator, size: int = 256, bank: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One scene: (image (4, size, size) uint8, boxes (M, 4) float32 xyxy, labels (M,) int64, condition)."""
    if bank is None:
        bank = noise_bank(size, int(rng.integers(2**31)))
    condition = CONDITIONS[int(rng.choice(len(CONDITIONS), p=CONDITION_P))]
    k = size / 256
    field = _lowfreq(rng, 4, size)
    base = rng.uniform(0.2, 0.6, 3).astype(np.float32)
    rgb = base[:, None, None] + 0.3 * (field[:3] - 0.5)
    ir = 0.3 + 0.2 * field[3]

    # Clutter: coloured shapes with no heat (RGB), warm blobs with no edges (IR).
    for _ in range(int(rng.integers(2, 9))):
        r = max(2, round(rng.uniform(3, 12) * k))
        cy, cx = rng.integers(0, size, 2)
        y0, y1, x0, x1 = max(0, cy - r), min(size, cy + r), max(0, cx - r), min(size, cx + r)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if rng.random() < 0.5 else np.ones((y1 - y0, x1 - x0), bool)
        rgb[:, y0:y1, x0:x1][:, blob] = rng.uniform(0.05, 1.0, 3).astype(np.float32)[:, None]
    for _ in range(int(rng.integers(1, 6))):
        s = rng.uniform(3, 10) * k
        cy, cx = rng.integers(0, size, 2)
        r = int(3 * s)
        y0, y1, x0, x1 = max(0, cy - r), min(size, cy + r), max(0, cx - r), min(size, cx + r)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        ir[y0:y1, x0:x1] += rng.uniform(0.1, 0.35) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))

    boxes, labels, taken = [], [], []
    crossover = condition == "crossover"
    for _ in range(int(rng.integers(2, 9))):
        cls = int(rng.integers(len(CLASS_NAMES)))
        lo, hi = LENGTHS[cls]
        mask, patch, heat = _shape(cls, max(4, round(rng.uniform(lo, hi) * k)), rng)
        if cls != 2:  # vessels and vehicles lie in any of four headings
            turns = int(rng.integers(4))
            mask, heat = np.rot90(mask, turns), np.rot90(heat, turns)
            patch = np.rot90(patch, turns, axes=(1, 2))
        h, w = mask.shape
        spot = _place(size, h, w, taken, rng)
        if spot is None:
            continue
        y, x = spot
        if crossover:
            delta = rng.uniform(-0.03, 0.03)
        elif cls != 2 and condition == "normal" and rng.random() < 0.2:
            delta = rng.uniform(0.0, 0.04)  # parked, engine off: cold
        else:
            delta = rng.uniform(0.18, 0.4)
        region = rgb[:, y : y + h, x : x + w]
        region[:, mask] = patch[:, mask]
        ir_region = ir[y : y + h, x : x + w]
        ir_region[mask] += delta * heat[mask]
        rows, cols = np.nonzero(mask)
        boxes.append([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1])
        labels.append(cls)
        taken.append((x, y, x + w, y + h))

    sigma = np.array([0.03, 0.03, 0.03, 0.02], dtype=np.float32)  # sensor noise per band
    if condition == "night":
        rgb = rgb * rng.uniform(0.03, 0.08)
        sigma[:3] = 0.035
    elif condition == "haze":
        t = rng.uniform(0.88, 0.95)
        rgb = rgb * (1 - t) + t * rng.uniform(0.7, 0.85)
    elif crossover:
        ir = 0.45 + 0.35 * (ir - 0.45)
        sigma[3] = 0.03
    image = np.concatenate([rgb, ir[None]], axis=0)
    image += sigma[:, None, None] * _noise(rng, bank, size)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (
        image,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        condition,
    )


def generate_split(split: str, n: int, size: int = 256, seed: int = 0) -> DetectionSplit:
    """`n` scenes of one split; scene i depends only on (seed, split, i)."""
    images = np.empty((n, 4, size, size), dtype=np.uint8)
    boxes, labels, names = [], [], []
    bank = noise_bank(size, seed)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        images[i], b, lab, condition = render_scene(rng, size, bank)
        boxes.append(b)
        labels.append(lab)
        names.append(f"{split}_{i:05d}_{condition}")
    return DetectionSplit(torch.from_numpy(images), boxes, labels, names)


def _cache_path(size: int, counts: dict[str, int], seed: int) -> Path:
    key = json.dumps({"v": GENERATOR_VERSION, "size": size, "counts": counts, "seed": seed}, sort_keys=True)
    return cache_dir() / f"rgbt-synthetic-v{GENERATOR_VERSION}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def _save(path: Path, splits: dict[str, DetectionSplit]) -> None:
    arrays = {}
    for name, s in splits.items():
        arrays[f"{name}_images"] = s.images.numpy()
        arrays[f"{name}_boxes"] = np.concatenate(s.boxes) if s.boxes else np.zeros((0, 4), np.float32)
        arrays[f"{name}_labels"] = np.concatenate(s.labels) if s.labels else np.zeros((0,), np.int64)
        arrays[f"{name}_counts"] = np.asarray([len(b) for b in s.boxes], dtype=np.int64)
        arrays[f"{name}_names"] = np.asarray(s.names)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, names: list[str]) -> dict[str, DetectionSplit]:
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for name in names:
            cuts = np.cumsum(z[f"{name}_counts"])[:-1]
            out[name] = DetectionSplit(
                torch.from_numpy(z[f"{name}_images"]),
                np.split(z[f"{name}_boxes"], cuts) if len(z[f"{name}_counts"]) else [],
                np.split(z[f"{name}_labels"], cuts) if len(z[f"{name}_counts"]) else [],
                [str(s) for s in z[f"{name}_names"]],
            )
    return out


def synthetic_splits(size: int, n_train: int, n_calib: int, n_eval: int, seed: int, cache: bool = True) -> DetectionSplits:
    """All three splits (both bands), from the cache when it holds them; the `rgbt-synthetic` dataset."""
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    counts = {"train": int(n_train), "calib": int(n_calib), "eval": int(n_eval)}
    if min(counts.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {counts}")
    path = _cache_path(size, counts, seed)
    splits = None
    if cache and path.exists():
        try:
            splits = _load(path, list(counts))
        except (OSError, ValueError, KeyError):
            splits = None  # a damaged cache file is regenerated
    if splits is None:
        splits = {name: generate_split(name, n, size, seed) for name, n in counts.items()}
        if cache:
            _save(path, splits)
    return DetectionSplits(splits["train"], splits["calib"], splits["eval"], list(CLASS_NAMES))


def write_yolo_layout(out: Path, splits: DetectionSplits) -> None:
    """Write a set as YOLO-txt pairs: images/<split>/*.png, imagesIR/<split>/*.png, labels/<split>/*.txt, data.yaml."""
    import yaml
    from PIL import Image

    for split_name in ("train", "calib", "eval"):
        split: DetectionSplit = getattr(splits, split_name)
        for sub in ("images", "imagesIR", "labels"):
            (out / sub / split_name).mkdir(parents=True, exist_ok=True)
        size_h, size_w = split.images.shape[2:]
        for i, name in enumerate(split.names):
            img = split.images[i].numpy()
            Image.fromarray(np.ascontiguousarray(img[:3].transpose(1, 2, 0))).save(out / "images" / split_name / f"{name}.png")
            Image.fromarray(img[3]).save(out / "imagesIR" / split_name / f"{name}.png")
            lines = []
            for (x1, y1, x2, y2), c in zip(split.boxes[i], split.labels[i], strict=True):
                cx, cy = (x1 + x2) / 2 / size_w, (y1 + y2) / 2 / size_h
                lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {(x2 - x1) / size_w:.6f} {(y2 - y1) / size_h:.6f}")
            (out / "labels" / split_name / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    data = {
        "path": ".",
        "train": "images/train",
        "val": "images/eval",
        "calib": "images/calib",
        "names": dict(enumerate(splits.class_names)),
    }
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    import inspect

    from edgeopt.data.rgbt import rgbt_synthetic

    defaults = {k: p.default for k, p in inspect.signature(rgbt_synthetic).parameters.items()}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write (YOLO-txt pair layout)")
    for name in ("size", "n_train", "n_calib", "n_eval", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name], help=f"default {defaults[name]}")
    args = parser.parse_args(argv)
    splits = synthetic_splits(args.size, args.n_train, args.n_calib, args.n_eval, args.seed, cache=False)
    write_yolo_layout(args.out, splits)
    total = len(splits.train) + len(splits.calib) + len(splits.eval)
    print(f"wrote {total} RGB–IR pairs to {args.out} (data.yaml, images/, imagesIR/, labels/)")


if __name__ == "__main__":
    main()
