"""Supervised training of the small classifiers that ship with edgeopt (deterministic).

`python -m edgeopt.training` retrains `targets/checkpoints/digits-mlp.safetensors` into
runs/retrained/ (`--out ... --overwrite` to replace the committed file). The same seed gives the
same bytes with one torch build; the committed file came from an earlier one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeopt.data import Splits
from edgeopt.evaluate import torch_outputs
from edgeopt.progress import progress
from edgeopt.tasks import ClassificationTask, Task, task_for


def train_classifier(
    model: nn.Module,
    splits: Splits,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
) -> float:
    """AdamW + one-cycle schedule on the train split with the task's loss; returns the eval split's
    primary metric (top-1 for classifiers, mAP50 for detectors)."""
    task = task_for(splits)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(splits.train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    with progress("training", total=steps) as bar:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(splits.train), generator=generator)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                x, y = task.batch(splits.train, idx)
                loss = task.loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.advance(info=f"epoch {epoch + 1}/{epochs}, loss {float(loss.detach()):.3f}")
    return evaluate(model, splits.eval, task)


def evaluate(model: nn.Module, split: Any, task: Task | None = None) -> float:
    task = task or ClassificationTask()
    return task.score(torch_outputs(model.eval(), task.inputs(split)), split)["accuracy"]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from edgeopt.artifact import save_weights
    from edgeopt.data import load_dataset
    from edgeopt.models import build_model
    from edgeopt.retraining import add_options, prepare

    parser = argparse.ArgumentParser(description="Train the digits MLP (targets/checkpoints/digits-mlp.safetensors).")
    parser.add_argument("--epochs", type=int, default=40)
    add_options(parser, "digits-mlp")
    args = parser.parse_args(argv)
    prepare(args)
    splits = load_dataset("digits", flatten=True)
    model = build_model("mlp", {"in_features": 64, "hidden": [256, 128]})
    accuracy = train_classifier(model, splits, epochs=args.epochs, seed=args.seed)
    save_weights(model, args.out)
    print(f"digits-mlp: eval top-1 {100 * accuracy:.2f}% -> {args.out}")


if __name__ == "__main__":
    main()
