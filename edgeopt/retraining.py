"""What every retraining script (`python -m edgeopt.training`, `edgeopt.models.train_digits`,
`edgeopt.moe.train`) shares: it writes to a new path unless told `--overwrite` (the committed
checkpoints are never replaced by accident), and it is bit-reproducible for a seed (one thread
by default, deterministic kernels, every generator seeded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

RETRAINED = Path("runs") / "retrained"


def add_options(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=RETRAINED / f"{name}.safetensors",
                        help=f"checkpoint to write [default: {RETRAINED}/{name}.safetensors]")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (e.g. the committed one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="fixed, for bit-reproducible results")


def prepare(args: argparse.Namespace, *outputs: Path) -> None:
    """Refuse to replace an existing output without --overwrite (one line, exit 2), then pin
    threads and deterministic kernels."""
    for out in (args.out, *outputs):
        if Path(out).exists() and not args.overwrite:
            print(f"error: {out} exists; pass --overwrite to replace it, or choose another --out", file=sys.stderr)
            sys.exit(2)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
