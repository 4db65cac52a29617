"""Low-Rank SS2D + structure-aware distillation on the digits VMamba, measured in one run.

    .venv/bin/python benchmarks/bench_lowrank_distill.py [--ratio 0.5] [--steps N] [--threads 1]

Teacher = targets/checkpoints/digits-vmamba.safetensors. The recipe's lowrank pass runs at the
ratio over every SS2D block, then its distill pass. Prints SS2D parameter reduction, eval top-1
of the teacher, the factorized model without and with distillation, MACs, and ONNX Runtime
latency of teacher and student timed side by side (interleaved, same process).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from edgeopt.recipes import load_recipe
from edgeopt.sweep import run_sweep, table

RECIPE = Path(__file__).resolve().parent.parent / "targets" / "digits-vmamba-lowrank.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, help="override the recipe's distillation steps")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    parser.add_argument("--out", type=Path, help="keep outputs here (default: a temporary directory)")
    args = parser.parse_args()
    console = Console(width=140)
    recipe = load_recipe(RECIPE)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-lowrank-"))
    start = time.perf_counter()
    rows = run_sweep(recipe, [args.ratio], out, distill_overrides={"steps": args.steps} if args.steps else None,
                     threads=args.threads, progress=False, log=lambda m: None)  # fmt: skip
    wall = time.perf_counter() - start
    teacher, student = rows
    console.print(table(rows))
    drop_plain = 100 * (teacher.accuracy - student.accuracy_lowrank)
    drop_distilled = 100 * (teacher.accuracy - student.accuracy)
    reduction = 1 - student.ss2d_params / teacher.ss2d_params
    speedup = teacher.latency_ms / student.latency_ms
    d = student.distill
    lines = [
        f"rank ratio {args.ratio} over all SS2D blocks; distill {d['steps']} steps (best at {d['best_step']}); "
        f"whole benchmark {wall:.0f} s",
        f"SS2D params        {teacher.ss2d_params:,} -> {student.ss2d_params:,}  ({100 * reduction:.1f}% fewer; "
        f"model {teacher.params:,} -> {student.params:,})",
        f"MACs               {teacher.macs / 1e6:.3f} M -> {student.macs / 1e6:.3f} M  "
        f"({teacher.macs / student.macs:.2f}x fewer)",
        f"eval top-1         teacher {100 * teacher.accuracy:.2f}% | low-rank, no distill "
        f"{100 * student.accuracy_lowrank:.2f}% (drop {drop_plain:.2f} pt) | low-rank + distill "
        f"{100 * student.accuracy:.2f}% (drop {drop_distilled:.2f} pt)",
        f"ORT latency        teacher {teacher.latency_ms:.3f} ms | student {student.latency_ms:.3f} ms  "
        f"(student/teacher {student.latency_ms / teacher.latency_ms:.3f}, speedup {speedup:.2f}x)",
        f"acceptance: >=40% fewer SS2D params {'PASS' if reduction >= 0.4 else 'FAIL'}; "
        f"distilled drop <= 1 pt {'PASS' if drop_distilled <= 1 else 'FAIL'}; "
        f"student faster {'PASS' if speedup > 1 else 'FAIL'}",
    ]
    for line in lines:
        console.print(line, highlight=False)


if __name__ == "__main__":
    main()
