"""Train the small VMamba digits classifier committed as targets/checkpoints/digits-vmamba.safetensors.

    python -m edgeopt.models.train_digits --out targets/checkpoints/digits-vmamba.safetensors --overwrite

Real data (scikit-learn's digits upscaled to 32x32, fixed split), fixed seed, one thread, CPU
only, a few minutes on 2 cores; the same seed gives the same bytes. Without `--out` it writes
runs/retrained/digits-vmamba.safetensors. Prints eval top-1; the checkpoint is written atomically.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.data import Split, load_dataset
from edgeopt.fileio import write_with
from edgeopt.models import build_model

DEFAULT_OUT = Path("targets/checkpoints/digits-vmamba.safetensors")


def accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in split.batches(batch_size))
    return correct / len(split)


def shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (background value -1), per batch."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def train(epochs: int = 15, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
          train_samples: int | None = None) -> tuple[nn.Module, float]:  # fmt: skip
    torch.manual_seed(seed)
    data = load_dataset("digits", size=32)
    if train_samples is not None:  # a quick run (tests), on the first samples of the fixed split
        data = replace(data, train=Split(data.train.x[:train_samples], data.train.y[:train_samples]))
    model = build_model("digits-vmamba").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(data.train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data.train), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x, y = shift(data.train.x[idx], generator), data.train.y[idx]
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} calib top-1 {accuracy(model, data.calib):.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    return model.eval(), accuracy(model, data.eval)


def main(argv: list[str] | None = None) -> None:
    from edgeopt.retraining import add_options, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-samples", type=int, default=None, help="train on the first N samples only (quick runs)")
    add_options(parser, "digits-vmamba")
    args = parser.parse_args(argv)
    prepare(args)
    model, top1 = train(epochs=args.epochs, seed=args.seed, train_samples=args.train_samples)
    print(f"eval top-1 {top1:.4f}")
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_with(args.out, lambda tmp: save_file(state, str(tmp)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
