"""`edgeopt datasets list|check`: see the registered datasets, validate RGB–IR data before a long run."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from edgeopt.errors import InputError

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
SHOWN_PROBLEMS = 20


@click.group()
def datasets() -> None:
    """Datasets: list the registered ones, check a local RGB–IR detection set."""


@datasets.command("list")
def datasets_list() -> None:
    """Registered datasets and the RGB–IR folder layouts `rgbt` reads."""
    from edgeopt.data import DATASETS
    from edgeopt.data.rgbt_layouts import LAYOUTS

    table = Table(title="datasets (load_dataset name)")
    table.add_column("name")
    table.add_column("what")
    for name in DATASETS.names():
        factory = DATASETS.get(name)
        doc = (factory.__doc__ or getattr(sys.modules.get(factory.__module__), "__doc__", None) or "").strip().splitlines()
        table.add_row(name, doc[0] if doc else "")
    console.print(table)
    layouts = Table(title="rgbt layouts (edgeopt datasets check PATH --layout ...)")
    layouts.add_column("layout")
    layouts.add_column("files")
    for name, files in LAYOUTS.items():
        layouts.add_row(name, files)
    console.print(layouts)


def _sizes(sizes: list[tuple[int, int]]) -> str:
    common = Counter(sizes).most_common(3)
    text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in common)
    return text + (", ..." if len(set(sizes)) > 3 else "")


@datasets.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["auto", "llvip", "yolo", "coco"]), default="auto", show_default=True,
              help="Folder layout; auto tells them apart by their files.")
@click.option("--label-source", type=click.Choice(["ir", "rgb"]), default="ir", show_default=True,
              help="Which band's annotations are the ground truth where a layout has both.")
def datasets_check(path: Path, layout: str, label_source: str) -> None:
    """Check an RGB–IR detection set: pairs, sizes, labels and boxes, counted per split and class.

    Reads image headers and annotations only (fast on large sets). Exit 2 with the
    first problem as a one-line error when anything is wrong.
    """
    from edgeopt.data.rgbt_layouts import scan

    found = scan(path, layout, label_source, collect=True)
    table = Table(title=f"{path} ({found.layout} layout, labels from {label_source.upper()})")
    for column in ("split", "pairs", "objects", "empty images", *found.class_names, "image sizes (count)"):
        table.add_column(column, justify="left" if column in ("split", "image sizes (count)") else "right")
    for split, samples in found.samples.items():
        labels = np.concatenate([s.labels for s in samples]) if samples else np.zeros(0, np.int64)
        per_class = np.bincount(labels, minlength=len(found.class_names))
        table.add_row(
            split, str(len(samples)), str(len(labels)), str(sum(len(s.labels) == 0 for s in samples)),
            *(str(int(n)) for n in per_class), _sizes([s.size for s in samples]),
        )
    console.print(table)
    if found.problems:
        for problem in found.problems[:SHOWN_PROBLEMS]:
            err_console.print(f"  {problem}", highlight=False, soft_wrap=True)
        if len(found.problems) > SHOWN_PROBLEMS:
            err_console.print(f"  ... and {len(found.problems) - SHOWN_PROBLEMS} more", highlight=False)
        more = f" ({len(found.problems)} problems, listed above)" if len(found.problems) > 1 else ""
        raise InputError(found.problems[0] + more)
    console.print(f"[green]ok[/]: {sum(map(len, found.samples.values()))} pairs, no problems")
