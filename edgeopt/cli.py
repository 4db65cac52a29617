"""The `edgeopt` command line: optimize, export, profile, report, profiles, passes.

Exit codes: 0 success, 1 a budget was missed, 2 usage or input error (one line;
the traceback only with --debug), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.table import Table

from edgeopt import __version__
from edgeopt.console import make_console, shared_console
from edgeopt.errors import InputError

console = shared_console()
err_console = make_console(stderr=True)


class BudgetMissed(Exception):
    """The optimized artifact misses one of its budgets (exit code 1)."""


class EdgeoptGroup(click.Group):
    """Maps InputError to a one-line message and exit 2; --debug shows tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except BudgetMissed as exc:
            err_console.print(f"[bold yellow]budget missed:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:  # click would exit 1, which means "a budget was missed"
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err_console.print("[bold red]interrupted[/]", highlight=False)
            sys.exit(130)


@click.group(cls=EdgeoptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors and third-party log output.")
@click.version_option(__version__, prog_name="edgeopt")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compress, export and profile trained PyTorch models for edge hardware."""
    ctx.obj = {"debug": debug}
    if debug:  # third-party log chatter too (edgeopt.console.third_party_quiet)
        os.environ["EDGEOPT_DEBUG"] = "1"


# -- optimize -----------------------------------------------------------------
@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Hardware profile name (see `edgeopt profiles list`) or YAML path.")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory [default: runs/<recipe>-<profile>].")
@click.option("--device", help="Profile on this inventory device over SSH instead of locally.")
@click.option("--runs", default=50, type=click.IntRange(min=1), show_default=True, help="Timed runs per artifact.")
@click.option("--min-seconds", default=1.0, type=click.FloatRange(min=0), show_default=True, help="Minimum timed duration per artifact.")
@click.option("--warmup", default=10, type=click.IntRange(min=0), show_default=True, help="Warm-up runs per artifact.")
def optimize(recipe: Path, profile_name: str, out: Path | None, device: str | None, runs: int, min_seconds: float, warmup: int) -> None:
    """Run RECIPE's passes for a hardware profile, profile every step, and report.

    Steps whose inputs and config did not change since the last run are skipped.
    Exits 1 when the final artifact misses a budget.
    """
    from edgeopt.fileio import read_json
    from edgeopt.pipeline import Pipeline, Timing, budgets_for, verdict
    from edgeopt.profiles import load_profile
    from edgeopt.recipes import load_recipe
    from edgeopt.report import build_report, print_report, write_report

    loaded = load_recipe(recipe)
    profile = load_profile(profile_name)
    run_dir = out or Path("runs") / f"{loaded.name}-{profile.name}"
    pipeline = Pipeline(
        loaded,
        profile,
        run_dir,
        runner=None,
        device=device,
        timing=Timing(warmup=warmup, runs=runs, min_seconds=min_seconds),
    )
    with console.status(f"optimizing {loaded.name} for {profile.name}") as status:
        pipeline.notify = lambda message: (status.update(message), console.log(message))
        steps = pipeline.run()
    bundle = run_dir / "bundle" / "meta.json"
    bundle_runtime = read_json(bundle)["runtime"] if bundle.is_file() else None
    report = build_report(loaded.name, profile, steps, verdict(steps, budgets_for(loaded, profile)), bundle_runtime)
    write_report(run_dir, report)
    print_report(report, console)
    console.print(f"run directory: {run_dir}")
    missed = [name for name, budget in report.budgets.items() if budget.ok is False]
    if missed:
        raise BudgetMissed(", ".join(missed))


# -- export -------------------------------------------------------------------
@cli.command("export")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite", "tensorrt", "pte"]), default="onnx", show_default=True,
              help="pte: ExecuTorch program (XNNPACK + edgeopt's C++ scan op; needs the op library on the device).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output model file.")
def export_cmd(recipe: Path, fmt: str, out: Path) -> None:
    """Export RECIPE's trained model (fp32) to ONNX, TFLite or ExecuTorch (.pte) and check parity."""
    from edgeopt.artifact import ModelArtifact, ModelSource
    from edgeopt.data import load_dataset
    from edgeopt.evaluate import artifact_outputs, parity, torch_outputs
    from edgeopt.exporters import export
    from edgeopt.fileio import writable_dir
    from edgeopt.models import build_model, check_input_shape
    from edgeopt.progress import progress
    from edgeopt.recipes import load_recipe

    loaded = load_recipe(recipe)
    writable_dir(out.parent)  # before the export, not after it
    spec = loaded.model
    model = build_model(spec.name, spec.kwargs, spec.checkpoint)
    check_input_shape(model, spec.input_shape)
    example = ModelArtifact("torch", Path(), ModelSource(spec.name), tuple(spec.input_shape)).example_input(2)
    if fmt == "tensorrt":
        from edgeopt.exporters.tensorrt import build_engine_from_model

        path = build_engine_from_model(model, example, out)
        console.print(f"wrote {path}")
        return
    with progress(f"exporting to {fmt}"):  # a spinner here, a line every 30 s in a CI log
        path = export(fmt, model, example, out)
    from edgeopt.tasks import task_for

    splits = load_dataset(loaded.dataset.name, **loaded.dataset.kwargs)
    task = task_for(splits)
    x = task.inputs(splits.eval, 256).numpy()
    check = parity(torch_outputs(model, x), artifact_outputs(ModelArtifact(fmt, path, ModelSource(spec.name), ()), x),
                   task.decide)  # fmt: skip
    console.print(
        f"wrote {path}: parity max abs {check['max_abs']:.2e}, cosine {check['cosine']:.6f}, "
        f"{'top-1' if task.metric == 'top-1' else 'per-anchor class'} agreement {check['top1_agreement']:.3f}"
    )


# -- profile ------------------------------------------------------------------
@cli.command("profile")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--recipe", type=click.Path(path_type=Path),
              help="Recipe whose eval split gives accuracy (for a model file) [default: latency and memory only].")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Runtime threads [default: the profile's].")
@click.option("--profile", "profile_name", default="x86-cpu", show_default=True, help="Hardware profile (threads).")
@click.option("--device", help="Inventory device to run on over SSH [default: this host].")
@click.option("--runs", default=50, type=click.IntRange(min=1), show_default=True)
@click.option("--min-seconds", default=1.0, type=click.FloatRange(min=0), show_default=True)
@click.option("--warmup", default=10, type=click.IntRange(min=0), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON result.")
def profile_cmd(artifact: Path, recipe: Path | None, threads: int | None, profile_name: str, device: str | None,
                runs: int, min_seconds: float, warmup: int, as_json: bool) -> None:
    """Profile ARTIFACT (an .onnx/.tflite file, or a bundle directory) for latency, memory, init time and,
    with a bundle or --recipe, accuracy. Without --recipe a model file is timed on random inputs of its
    own input shape."""
    import json
    import tempfile

    from edgeopt.profiler.runners import profile_bundle, profile_model
    from edgeopt.profiles import load_profile

    timing = {"runs": runs, "min_seconds": min_seconds, "warmup": warmup}
    runner = None  # the device's own runner (ssh), or local without a device
    if artifact.is_dir():
        result = profile_bundle(artifact, runner=runner, device=device, threads=threads, **timing)
    else:
        if not artifact.is_file():
            raise InputError(f"artifact not found: {artifact}")
        from edgeopt.profiler.bundle import MODEL_SUFFIXES

        runtime = next((r for r, suffixes in MODEL_SUFFIXES.items() if artifact.suffix in suffixes), None)
        if runtime is None:
            raise InputError(f"unknown model format '{artifact.suffix}' (expected .onnx, .tflite, .pte or .engine)")
        if threads is None:  # on this host, more threads than cores only measures contention
            threads = load_profile(profile_name).threads
            threads = threads if device else min(threads, os.cpu_count() or 1)
        if recipe is None:
            import numpy as np

            from edgeopt.profiler.inputs import synthetic_inputs

            x, batch = synthetic_inputs(artifact, runtime)
            data = {"eval_x": x, "eval_y": np.zeros(len(x), np.int64), "labelled": False, "batch_size": batch}
        else:
            from edgeopt.data import load_dataset
            from edgeopt.recipes import load_recipe
            from edgeopt.tasks import task_for

            loaded = load_recipe(recipe)
            splits = load_dataset(loaded.dataset.name, **loaded.dataset.kwargs)
            task = task_for(splits)
            scoring = task.bundle_eval(splits.eval)
            data = {"eval_x": task.inputs(splits.eval).numpy(), "eval_y": scoring.pop("eval_y", None), **scoring}
        with tempfile.TemporaryDirectory() as work:
            result = profile_model(artifact, runtime, threads=threads, work_dir=Path(work), runner=runner,
                                   device=device, **data, **timing)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from edgeopt.report.cells import Table as Cells
    from edgeopt.report.cells import ms, spread, unit
    from edgeopt.report.model import Latency, measurement
    from edgeopt.report.terminal import rich_table

    lat = Latency.from_profile(result["latency_ms"])
    name, scale = unit([lat])
    scores = result.get("accuracy") or {}
    accuracy = f"{100 * scores.get('value', scores.get('top1', 0.0)):.2f}" if scores else "—"
    cells = Cells(["runtime", "threads", f"p50 {name}", f"p10–p90 {name}", f"p99 {name}", "init ms", "peak MB",
                   f"{scores.get('metric', 'top-1')} %"],
                  [[result["runtime"], str(result["threads"]), ms(lat.p50, scale), spread(lat, scale),
                    ms(lat.p99, scale), f"{result['init_ms']:.1f}", f"{result['peak_rss_mb']:.0f}", accuracy]])
    title = f"{artifact.name}: {measurement(load_profile(profile_name), result).label}"
    console.print(rich_table(cells, console.width, title=title))
    if not result.get("accuracy"):
        console.print("timed on random inputs of the model's input shape; give --recipe for accuracy", style="dim")


# -- report -------------------------------------------------------------------
@cli.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Where report.md/report.html go [default: RUN_DIR].")
def report_cmd(run_dir: Path, out: Path | None) -> None:
    """Show the report of RUN_DIR with the device results of `edgeopt devices profile|profile-all`
    (RUN_DIR/profile/*.json, failures included), and rewrite its report.md and report.html."""
    from edgeopt.fileio import writable_dir
    from edgeopt.report import load_devices, load_report, print_report, write_views

    report = load_report(run_dir).with_devices(load_devices(run_dir))
    out = writable_dir(out or run_dir)  # before the plots are drawn
    print_report(report, console)
    console.print(f"wrote {write_views(out, report)}")


# -- regress ------------------------------------------------------------------
@cli.command()
@click.option("--targets", type=click.Path(path_type=Path), default=Path("targets"), show_default=True,
              help="Directory of recipes.")
@click.option("--baselines", type=click.Path(path_type=Path), default=Path("targets/baselines.json"),
              show_default=True, help="Committed baseline figures.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/regress"), show_default=True)
@click.option("--update", is_flag=True, help="Rewrite the baselines with this run's figures.")
@click.option("--profile", "only_profiles", multiple=True, help="Only these profiles [default: every one this host runs].")
@click.option("--runs", default=30, type=click.IntRange(min=1), show_default=True)
@click.option("--min-seconds", default=0.5, type=click.FloatRange(min=0), show_default=True)
def regress(targets: Path, baselines: Path, out: Path, update: bool, only_profiles: tuple[str, ...], runs: int,
            min_seconds: float) -> None:
    """Run every recipe for every profile this host can execute and compare with baselines.

    Exits 1 on a regression (accuracy, size, latency ratio vs the fp32 export, or a budget).
    """
    from edgeopt.pipeline import Timing
    from edgeopt.regress import run_regression

    if not targets.is_dir():
        raise InputError(f"targets directory not found: {targets}")
    with console.status("regression check") as status:
        checks, measured = run_regression(targets, baselines, out, update, Timing(warmup=5, runs=runs, min_seconds=min_seconds),
                                          only_profiles=list(only_profiles) or None,
                                          notify=lambda message: (status.update(message), console.log(message)))
    from edgeopt.regress import host_isa
    from edgeopt.report.cells import Table as Cells
    from edgeopt.report.terminal import rich_table

    cells = Cells(["recipe", "profile", "metric", "measured", "limit", "source", "verdict"],
                  [[c.recipe, c.profile, c.metric, f"{c.measured:.4f}", f"{c.limit:.4f}", c.source,
                    "ok" if c.ok else "REGRESSION"] for c in checks], left=3)
    console.print(rich_table(cells, console.width, title=f"regression check on {host_isa()}", styled=6))
    if update:
        console.print(f"baselines rewritten: {baselines} ({len(measured)} recipe×profile pairs)")
        return
    failed = [c for c in checks if not c.ok]
    if failed:
        raise BudgetMissed(f"{len(failed)} regression(s): " + ", ".join(f"{c.recipe}@{c.profile} {c.metric}" for c in failed))
    console.print(f"no regression in {len(checks)} checks")


# -- profiles / passes ----------------------------------------------------------
@cli.group()
def profiles() -> None:
    """Hardware profiles in profiles/."""


@profiles.command("list")
def profiles_list() -> None:
    """List the hardware profiles."""
    from edgeopt.profiles import load_profile_file, profile_paths

    table = Table()
    for column in ("name", "arch", "cpu", "memory MB", "accelerator", "runtimes", "threads"):
        table.add_column(column)
    for path in profile_paths().values():
        p = load_profile_file(path)
        table.add_row(p.name, p.arch, f"{p.cpu.model} ×{p.cpu.cores}", str(p.memory_mb), p.accelerator.model or p.accelerator.kind,
                      ", ".join(p.runtimes), str(p.threads))
    console.print(table)


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Show one profile, validated."""
    import yaml

    from edgeopt.profiles import load_profile

    click.echo(yaml.safe_dump(load_profile(name).model_dump(mode="json"), sort_keys=False))


@cli.group()
def passes() -> None:
    """Registered optimization passes."""


@passes.command("list")
def passes_list() -> None:
    """List passes with their config fields and defaults."""
    from edgeopt.passes import PASSES, _load_builtins

    _load_builtins()
    table = Table()
    for column in ("pass", "option", "default", "meaning"):
        table.add_column(column)
    for name in PASSES.names():
        cls = PASSES.get(name)
        for index, (key, field) in enumerate(cls.Config.model_fields.items()):
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            table.add_row(name if index == 0 else "", key, default, field.description or "")
        table.add_section()
    console.print(table)


def _attach_plugins() -> None:
    """Command groups that live with their feature (MoE runtime, device inventory)."""
    import importlib

    for module, attr in (("edgeopt.moe.cli", "moe"), ("edgeopt.profiler.cli", "devices"), ("edgeopt.sweep", "sweep"),
                         ("edgeopt.stepcache", "cache"), ("edgeopt.data.cli", "datasets")):
        cli.add_command(getattr(importlib.import_module(module), attr))


_attach_plugins()


def main() -> None:
    cli()
