"""`edgeopt sweep RECIPE --rank-ratios 0.65,0.6,0.55,0.5`: DLRMamba's rank-ratio study on a recipe.

For every ratio the recipe's `lowrank` step runs with that ratio (its other options kept), then its
`distill` step; accuracy is measured with and without distillation on the eval split, and every
model is exported for the profile's runtime (what `format: auto` picks: LiteRT for rpi5, ONNX
Runtime for x86-cpu and the Jetsons) and timed side by side in one process (see
`edgeopt.lowrank.measure`). Prints the table, writes `sweep.json` and an accuracy-vs-latency
Pareto plot (`pareto.png`) into the output directory. `sweep.json` is rewritten after every ratio,
so an interrupted sweep keeps its finished rows, and a rerun with the same settings resumes: it
reuses those rows' students and only times everything again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch

from edgeopt.artifact import TORCH, ModelArtifact, ModelSource, save_weights
from edgeopt.data import load_dataset
from edgeopt.errors import InputError
from edgeopt.evaluate import torch_outputs
from edgeopt.fileio import exclusive, write_json, write_with
from edgeopt.lowrank.measure import (
    TIMING_SUFFIX,
    export_for_timing,
    latency_ms,
    macs,
    params,
    scan_flops,
    ss2d_params,
)
from edgeopt.models import build_model, check_input_shape
from edgeopt.passes import PassContext, make_pass
from edgeopt.passes.export import host_format
from edgeopt.profiles import load_profile
from edgeopt.progress import step_label
from edgeopt.recipes import Recipe, load_recipe
from edgeopt.tasks import task_for

# DLRMamba Table VI (VEDAI, Raspberry Pi 5, FP32): rank ratio -> (mAP50, FPS), for reference beside
# a detector sweep; their teacher: 81.5 mAP50, 0.42 FPS.
PAPER_TABLE_VI = {0.65: (80.2, 0.64), 0.60: (79.6, 0.98), 0.55: (76.7, 1.13), 0.50: (75.5, 1.22)}
PAPER_TEACHER = (81.5, 0.42)


@dataclass
class Row:
    name: str  # "teacher" or "ratio 0.50"
    ratio: float | None
    params: int
    ss2d_params: int
    macs: int
    accuracy_lowrank: float | None  # eval primary metric (top-1 / mAP50) right after factorization
    accuracy: float  # eval primary metric (after distillation for students)
    scan_flops: int = 0  # the selective scans' elementwise work, invisible to MACs
    latency_ms: float = float("nan")
    distill: dict[str, Any] | None = None
    artifact: dict[str, Any] | None = None  # the distilled student (ModelArtifact.to_json), for resuming


def run_sweep(
    recipe: Recipe,
    ratios: list[float],
    out_dir: Path,
    profile_name: str = "x86-cpu",
    distill_overrides: dict[str, Any] | None = None,
    threads: int = 1,
    progress: bool = True,
    log=print,  # noqa: ANN001
) -> list[Row]:
    """Teacher row first, then one row per ratio; every model timed in the same interleaved run."""
    lowrank_cfg, distill_cfg = _step_config(recipe, "lowrank"), _step_config(recipe, "distill")
    distill_cfg.update(distill_overrides or {})
    profile = load_profile(profile_name)
    splits = load_dataset(recipe.dataset.name, **recipe.dataset.kwargs)
    spec = recipe.model
    teacher_module = build_model(spec.name, spec.kwargs, spec.checkpoint)
    check_input_shape(teacher_module, spec.input_shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(teacher_module, out_dir / "teacher.safetensors")
    teacher = ModelArtifact(TORCH, out_dir / "teacher.safetensors", ModelSource(spec.name, dict(spec.kwargs)),
                            tuple(spec.input_shape), module=teacher_module)  # fmt: skip
    example = teacher.example_input(1)
    task = task_for(splits)
    eval_x = task.inputs(splits.eval)

    def accuracy(module: torch.nn.Module) -> float:
        return task.score(torch_outputs(module, eval_x, batch_size=32), splits.eval)["accuracy"]

    key = _sweep_key(recipe, lowrank_cfg, distill_cfg, profile_name)
    finished = _finished_rows(out_dir / SWEEP_JSON, key)
    rows = [Row("teacher", None, params(teacher_module), ss2d_params(teacher_module), macs(teacher_module, example),
                None, accuracy(teacher_module), scan_flops(teacher_module, example))]  # fmt: skip
    fmt = host_format(profile)
    suffix, runtime = TIMING_SUFFIX[fmt], RUNTIME_NAME[fmt]
    exported = {"teacher": export_for_timing(teacher_module, example, out_dir / f"teacher{suffix}")}
    _write_rows(out_dir, recipe.name, key, rows, task.metric, runtime)
    for ratio in ratios:
        name = f"ratio {ratio:.2f}"
        step = out_dir / f"ratio-{ratio:.2f}"
        row = finished.get(ratio)
        if row is not None:
            distilled = ModelArtifact.from_json(row.artifact).load_module()
            log(f"{name}: finished by an earlier run, reused from {SWEEP_JSON}")
        else:
            ctx = PassContext(splits, profile, step / "lowrank", [teacher], seed=recipe.seed)
            ctx.step_dir.mkdir(parents=True, exist_ok=True)
            student = make_pass("lowrank", {**lowrank_cfg, "rank_ratio": ratio}).run(teacher, ctx)
            lowrank_acc = accuracy(student.load_module())
            log(f"{name}: factorized, eval {task.metric} {100 * lowrank_acc:.2f} before distillation")
            dctx = PassContext(splits, profile, step / "distill", [teacher, student], seed=recipe.seed)
            dctx.step_dir.mkdir(parents=True, exist_ok=True)
            with step_label(f"sweep {name}"):  # distill's progress lines in a CI log name the ratio
                result = make_pass("distill", distill_cfg).run(student, dctx)
            distilled = result.load_module()
            row = Row(name, ratio, params(distilled), ss2d_params(distilled), macs(distilled, example), lowrank_acc,
                      accuracy(distilled), scan_flops(distilled, example),
                      distill={k: v for k, v in dctx.metrics.items() if k != "history"},
                      artifact=result.to_json())  # fmt: skip
            log(f"{name}: distilled, eval {task.metric} {100 * row.accuracy:.2f} ({row.distill['steps']} steps)")
        rows.append(row)
        exported[name] = export_for_timing(distilled, example, step / f"student{suffix}")
        _write_rows(out_dir, recipe.name, key, rows, task.metric, runtime)  # a later failure or timeout keeps this row
    log(f"timing {len(exported)} {runtime} models side by side ({threads} thread{'s' * (threads > 1)})")
    latency = latency_ms(exported, example.numpy(), threads=threads)
    for row in rows:
        row.latency_ms = latency[row.name]
    _write_rows(out_dir, recipe.name, key, rows, task.metric, runtime)
    pareto_plot(rows, out_dir / "pareto.png", recipe.name, task.metric, runtime)
    return rows


SWEEP_JSON = "sweep.json"
RUNTIME_NAME = {"onnx": "ONNX Runtime", "tflite": "LiteRT"}


def _sweep_key(recipe: Recipe, lowrank_cfg: dict[str, Any], distill_cfg: dict[str, Any], profile_name: str) -> str:
    """What makes a finished row reusable: the model, data, seed, both passes' settings and edgeopt's code."""
    import hashlib
    import json

    from edgeopt.pipeline import code_version

    data = {"model": recipe.model.model_dump(mode="json"), "dataset": recipe.dataset.model_dump(mode="json"),
            "seed": recipe.seed, "lowrank": lowrank_cfg, "distill": distill_cfg, "profile": profile_name,
            "code": code_version()}  # fmt: skip
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_rows(out_dir: Path, recipe_name: str, key: str, rows: list[Row], metric: str, runtime: str) -> None:
    def plain(row: Row) -> dict[str, Any]:
        data = asdict(row)
        data["latency_ms"] = None if math.isnan(row.latency_ms) else row.latency_ms  # not yet timed
        return data

    write_json(out_dir / SWEEP_JSON, {"recipe": recipe_name, "metric": metric, "runtime": runtime, "key": key,
                                      "rows": [plain(r) for r in rows]})  # fmt: skip


def _finished_rows(path: Path, key: str) -> dict[float, Row]:
    """Rows of an earlier, interrupted sweep with the same settings whose student is still on disk."""
    import json

    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return {}
        rows = [Row(**{**r, "latency_ms": float("nan")}) for r in data["rows"][1:]]
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    return {r.ratio: r for r in rows if r.artifact and Path(r.artifact["path"]).is_file()}


def _step_config(recipe: Recipe, name: str) -> dict[str, Any]:
    return next((dict(s.config) for s in recipe.passes if s.name == name), {})


def table(rows: list[Row], metric: str = "top-1", runtime: str = "ONNX Runtime"):  # noqa: ANN201
    """DLRMamba's Table VI layout: ratio, params, MMACs (+ scan work), metric without / with
    distillation, latency and FPS; for a detector also the paper's mAP50 / Pi 5 FPS per ratio."""
    from rich.table import Table

    teacher = rows[0]
    paper = metric == "mAP50"
    out = Table(title=f"rank-ratio sweep ({metric} on the eval split; latency: {runtime}, batch 1)")
    columns = ["model", "params", "SS2D params", "MMACs", "scan MFLOPs", f"{metric} no distill",
               f"{metric} distilled", "latency ms", "FPS", "speedup"]  # fmt: skip
    if paper:
        columns += ["paper mAP50", "paper Pi 5 FPS"]
    for column in columns:
        out.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        cells = [
            r.name, f"{r.params:,}",
            f"{r.ss2d_params:,} ({r.ss2d_params / teacher.ss2d_params:.0%})" if teacher.ss2d_params else "-",
            f"{r.macs / 1e6:.2f}", f"{r.scan_flops / 1e6:.2f}",
            "-" if r.accuracy_lowrank is None else f"{100 * r.accuracy_lowrank:.2f}",
            f"{100 * r.accuracy:.2f}", f"{r.latency_ms:.3f}", f"{1e3 / r.latency_ms:.1f}",
            f"{teacher.latency_ms / r.latency_ms:.2f}x",
        ]  # fmt: skip
        if paper:
            ref = PAPER_TEACHER if r.ratio is None else PAPER_TABLE_VI.get(round(r.ratio, 2))
            cells += [f"{ref[0]:.1f}", f"{ref[1]:.2f}"] if ref else ["-", "-"]
        out.add_row(*cells)
    return out


def pareto_plot(rows: list[Row], path: Path, title: str, metric: str = "top-1", runtime: str = "ONNX Runtime") -> Path:
    """Accuracy vs latency: teacher, students with and without distillation, and the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r.latency_ms, 100 * r.accuracy, r.name) for r in rows]
    points += [(r.latency_ms, 100 * r.accuracy_lowrank, f"{r.name} (no distill)") for r in rows[1:]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([p[0] for p in points[:1]], [p[1] for p in points[:1]], marker="*", s=160, label="teacher")
    ax.scatter(
        [r.latency_ms for r in rows[1:]], [100 * r.accuracy for r in rows[1:]], label="low-rank + distill"
    )
    ax.scatter([r.latency_ms for r in rows[1:]], [100 * r.accuracy_lowrank for r in rows[1:]], facecolors="none",
               edgecolors="gray", label="low-rank, no distill")  # fmt: skip
    for x, y, label in points[: len(rows)]:
        ax.annotate(
            label.replace("ratio ", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    front = pareto_front([(x, y) for x, y, _ in points])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red", label="Pareto front")
    ax.set(
        xlabel=f"{runtime} latency (ms, batch 1)",
        ylabel=f"eval {metric} (points)",
        title=f"{title}: accuracy vs latency",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--rank-ratios must be comma-separated numbers, got {text!r}") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise InputError(f"--rank-ratios must be in (0, 1], got {text!r}")
    return ratios


@click.command("sweep")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--rank-ratios", default="0.65,0.6,0.55,0.5", show_default=True, help="Comma-separated rank ratios."
)
@click.option(
    "--profile", "profile_name", default="x86-cpu", show_default=True, help="Hardware profile: its passes' settings and the runtime that times the models."
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output directory [default: runs/<recipe>-sweep]."
)
@click.option("--steps", type=int, help="Override the recipe's distillation steps.")
@click.option("--threads", default=1, show_default=True, help="Runtime threads for timing.")
def sweep(
    recipe: Path, rank_ratios: str, profile_name: str, out: Path | None, steps: int | None, threads: int
) -> None:
    """Factorize RECIPE's model at each rank ratio, distill, and compare accuracy and latency."""
    import json

    from edgeopt.console import shared_console

    console = shared_console()
    ratios = parse_ratios(rank_ratios)
    loaded = load_recipe(recipe)
    if not any(s.name == "lowrank" for s in loaded.passes):
        raise InputError(f"recipe {recipe} has no lowrank pass to sweep")
    out_dir = out or Path("runs") / f"{loaded.name}-sweep"
    with exclusive(out_dir):  # writable, and no second sweep writing the same rows
        rows = run_sweep(loaded, ratios, out_dir, profile_name, {"steps": steps} if steps else None, threads,
                         log=console.log)  # fmt: skip
    written = json.loads((out_dir / SWEEP_JSON).read_text())
    console.print(table(rows, written["metric"], written["runtime"]))
    console.print(f"wrote {out_dir / 'sweep.json'} and {out_dir / 'pareto.png'}")
