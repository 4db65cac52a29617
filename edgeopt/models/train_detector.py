"""Train the RGB–IR fusion detector committed as targets/checkpoints/rgbt-vmamba-det.safetensors.

    python -m edgeopt.models.train_detector [--epochs 12] [--out PATH] [--overwrite]

Seeded, CPU only. Data: the `rgbt-synthetic` set (or any detection dataset of the registry);
loss: TAL + BCE + GIoU + L1 (`edgeopt.tasks.detection_loss`); AdamW with warm-up + cosine,
random horizontal flips. The calibration split's mAP50 picks the kept epoch; the eval split is
scored once, at the end. Training uses the chunked scan (autograd), evaluation the fused kernel.
`--crop-epochs` trains the first epochs on random 128x128 windows at full scale (4x cheaper per
image; the model is resolution-agnostic) before the full-image epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeopt.data import load_dataset
from edgeopt.errors import InputError
from edgeopt.evaluate import count_params, torch_outputs
from edgeopt.fileio import write_with
from edgeopt.models import build_model
from edgeopt.tasks.detection import DetectionTask
from edgeopt.tasks.detection_loss import detection_loss

DEFAULT_OUT = Path("targets/checkpoints/rgbt-vmamba-det.safetensors")


def flip(x: torch.Tensor, targets: list, size: int) -> tuple[torch.Tensor, list]:
    """Horizontal flip of a batch and its boxes."""
    flipped = [(torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1), lab) for b, lab in targets]
    return x.flip(-1), flipped


def crop(x: torch.Tensor, targets: list, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list]:
    """A random size x size window of the batch (one offset for all images); boxes are clipped to it
    and dropped when less than 40% of them (or under 2 px a side) remains. Objects keep their scale,
    so training on crops costs (size / H)^2 of full images and still matches full-image evaluation."""
    full = x.shape[-1]
    ox, oy = (int(v) for v in torch.randint(0, full - size + 1, (2,), generator=generator))
    out = []
    for boxes, labels in targets:
        shifted = boxes - torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)
        clipped = shifted.clamp(0, size)
        wh = clipped[:, 2:] - clipped[:, :2]
        area = (shifted[:, 2:] - shifted[:, :2]).prod(1).clamp(min=1e-9)
        keep = (wh.prod(1) / area >= 0.4) & (wh >= 2).all(1)
        out.append((clipped[keep], labels[keep]))
    return x[..., oy : oy + size, ox : ox + size], out


def evaluate(model: nn.Module, task: DetectionTask, split, limit: int | None = None) -> dict[str, float]:  # noqa: ANN001
    x = task.inputs(split)
    if limit is not None and limit < len(x):
        from dataclasses import replace

        split = replace(split, images=split.images[:limit], boxes=split.boxes[:limit], labels=split.labels[:limit])
        x = x[:limit]
    return task.score(torch_outputs(model.eval(), x, batch_size=16), split)


def train(
    model: nn.Module,
    splits,  # noqa: ANN001
    epochs: int = 12,
    batch_size: int = 16,
    lr: float = 2e-3,
    crop_epochs: int = 0,
    crop_size: int = 128,
    seed: int = 0,
    max_minutes: float | None = None,
    steps: int | None = None,
    log=print,  # noqa: ANN001
) -> tuple[nn.Module, dict]:
    """Train in place; ends on the evaluation with the best calibration mAP50. Returns (model, info).

    The run is `steps` optimizer steps (default: `epochs` epochs). With `max_minutes`, the step
    count is instead fitted to the budget from the first steps' pace and logged, so a later run
    with `--steps N` repeats it exactly (same seed, same batches)."""
    torch.manual_seed(seed)
    task = DetectionTask.for_splits(splits)
    train_split = splits.train
    n = len(train_split.images)
    per_epoch = -(-n // batch_size)
    total = steps or epochs * per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, history, losses = -1.0, None, [], []
    start = time.perf_counter()
    step, warmup = 0, max(1, total // 10)

    def lr_at(i: int) -> float:  # linear warm-up, cosine decay to 5%
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup))))

    def evaluate_calib() -> None:
        nonlocal best, best_state
        calib = evaluate(model, task, splits.calib)
        history.append({"step": step, "loss": float(np.mean(losses[-per_epoch:])), "calib_map50": calib["map50"],
                        "calib_map50_95": calib["map50_95"], "seconds": round(time.perf_counter() - start, 1)})
        log(f"step {step}/{total} loss {np.mean(losses[-per_epoch:]):.3f} calib mAP50 {calib['map50']:.3f} "
            f"mAP50-95 {calib['map50_95']:.3f} ({time.perf_counter() - start:.0f}s)")
        if calib["map50"] > best:
            best, best_state = calib["map50"], {k: v.detach().clone() for k, v in model.state_dict().items()}

    while step < total:
        order = torch.randperm(n, generator=generator)
        use_crops = step // per_epoch < crop_epochs
        for i in range(0, n, batch_size):
            if step >= total:
                break
            model.train()
            x, targets = task.batch(train_split, order[i : i + batch_size])
            if torch.rand((), generator=generator) < 0.5:
                x, targets = flip(x, targets, task.img_size)
            size = task.img_size
            if use_crops:
                x, targets = crop(x, targets, crop_size, generator)
                size = crop_size
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = detection_loss(model(x), targets, size, task.strides)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_minutes is not None and step == 3 and steps is None:
                pace = (time.perf_counter() - start) / 3
                total = max(step, int(60 * max_minutes / pace))
                warmup = max(1, total // 10)
                log(f"  {pace:.1f} s/step: {total} steps fit {max_minutes} minutes (repeat with --steps {total})")
            if step % 25 == 0:
                log(f"  step {step}/{total} loss {np.mean(losses[-25:]):.3f} ({time.perf_counter() - start:.0f}s)")
            if step % per_epoch == 0 or step == total:
                evaluate_calib()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), {"history": history, "best_calib_map50": best, "steps": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rgbt-vmamba-det")
    parser.add_argument("--dataset", default="rgbt-synthetic")
    parser.add_argument("--bands", default="rgbt", choices=["rgbt", "rgb", "ir"], help="bands the data keeps")
    parser.add_argument("--n-train", type=int, default=None, help="training images (dataset default if unset)")
    parser.add_argument("--n-calib", type=int, default=None, help="calibration images (picks the kept epoch)")
    parser.add_argument("--n-eval", type=int, default=None, help="eval images (scored once at the end)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--crop-epochs", type=int, default=0, help="first epochs on 128x128 crops")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: epochs x batches)")
    parser.add_argument("--max-minutes", type=float, default=None, help="fit the step count to this budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (continue a run)")
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: {args.out} exists (pass --overwrite to replace it)")
    torch.set_num_threads(args.threads)
    data_kwargs = {"bands": args.bands, "seed": args.seed}
    for key in ("n_train", "n_calib", "n_eval"):
        if getattr(args, key) is not None:
            data_kwargs[key] = getattr(args, key)
    try:
        splits = load_dataset(args.dataset, **data_kwargs)
        model = build_model(args.model, {"num_classes": splits.num_classes}, args.init).train()
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.model}: {count_params(model):,} parameters; {len(splits.train.images)} training images")
    model, info = train(model, splits, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        crop_epochs=args.crop_epochs, seed=args.seed, max_minutes=args.max_minutes,
                        steps=args.steps)
    task = DetectionTask.for_splits(splits)
    scores = evaluate(model, task, splits.eval)
    print(f"eval mAP50 {scores['map50']:.4f} mAP50-95 {scores['map50_95']:.4f}")
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_with(args.out, lambda tmp: save_file(state, str(tmp)))
    log = args.out.with_suffix(".json")
    write_with(log, lambda tmp: Path(tmp).write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "eval": scores, **info}, indent=1)))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
