"""Does the synthetic RGB–IR set need fusion? A patch-classifier proxy, one per band choice.

This checks the *data*, not edgeopt's detector (benchmarks/bench_detect.py trains the
real one): a ~25 K-parameter CNN learns to label 48x48 windows as background / vessel /
vehicle / person — windows centred on objects and random background windows with the
clutter in them — from RGB only, IR only, or both (the unused band zeroed, same
network, same budget). Scored on the eval split per scene condition: the share of
objects recognised (right class) and of background windows called background. A set
where fusion matters shows RGB-only failing night and haze, IR-only failing crossover,
and the fused network good everywhere. A full detector costs too much CPU for this
check; recognising an object in its window is the part of detection the data decides.

    python benchmarks/bench_synthetic_fusion.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeopt.data import load_dataset
from edgeopt.data.detection import DetectionSplit

WINDOW = 48


def windows(split: DetectionSplit, rng: np.random.Generator, bg_per_image: int = 3):
    """(patches (P, 4, 48, 48) uint8, labels (P,) 0 = background, condition per patch)."""
    size = split.images.shape[-1]
    half = WINDOW // 2
    padded = F.pad(split.images, (half, half, half, half))
    patches, labels, conds = [], [], []
    for i, (boxes, classes, name) in enumerate(zip(split.boxes, split.labels, split.names, strict=True)):
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        cond = name.rsplit("_", 1)[1]
        for (cx, cy), c in zip(centres.astype(int), classes, strict=True):
            patches.append(padded[i, :, cy : cy + WINDOW, cx : cx + WINDOW])
            labels.append(int(c) + 1)
            conds.append(cond)
        for _ in range(bg_per_image):
            for _ in range(20):
                cx, cy = rng.integers(0, size, 2)
                # background: no object inside the central half of the window
                if not ((np.abs(centres - [cx, cy]) < WINDOW / 2).all(axis=1)).any():
                    patches.append(padded[i, :, cy : cy + WINDOW, cx : cx + WINDOW])
                    labels.append(0)
                    conds.append(cond)
                    break
    return torch.stack(patches), torch.as_tensor(labels), np.asarray(conds)


def network(classes: int) -> nn.Module:
    def conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(conv(4, 16), conv(16, 32), conv(32, 48), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(48, classes))


def run(bands: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = load_dataset("rgbt-synthetic", n_train=args.n_train, n_eval=args.n_eval, seed=0, bands=bands)
    x, y, _ = windows(data.train, rng)
    ex, ey, econd = windows(data.eval, rng)
    model = network(data.num_classes + 1)
    steps = int(args.epochs * len(y) // args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.time()
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(y), args.batch))
        batch = x[idx].float() / 127.5 - 1
        if rng.random() < 0.5:
            batch = batch.flip(-1)
        loss = F.cross_entropy(model(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(ex[i : i + 512].float() / 127.5 - 1).argmax(1) for i in range(0, len(ey), 512)]).numpy()
    truth = ey.numpy()
    scores = {}
    for cond in ("all", "normal", "night", "haze", "crossover"):
        sel = np.ones(len(truth), bool) if cond == "all" else econd == cond
        obj, bg = sel & (truth > 0), sel & (truth == 0)
        scores[cond] = (float((pred[obj] == truth[obj]).mean()), float((pred[bg] == 0).mean()))
    print(f"{bands:5s} " + "  ".join(f"{k} {100 * o:5.1f}/{100 * b:5.1f}" for k, (o, b) in scores.items())
          + f"   ({steps} steps, {time.time() - t0:.0f} s)", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bands", default="rgbt,rgb,ir")
    args = parser.parse_args()
    print(f"patch proxy ({sum(p.numel() for p in network(4).parameters()) / 1e3:.0f} K params), {args.epochs} epoch(s);"
          " per condition: objects recognised % / background kept %")
    results = {b: run(b, args) for b in args.bands.split(",")}
    if {"rgbt", "rgb", "ir"} <= results.keys():
        best = max(results["rgb"]["all"][0], results["ir"]["all"][0])
        print(f"objects recognised, fused - best single band: {100 * (results['rgbt']['all'][0] - best):+.1f} points")


if __name__ == "__main__":
    main()
