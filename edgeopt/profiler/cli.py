"""`edgeopt devices ...`: list and check inventory devices, deploy and profile a run's bundle.

A run directory `runs/<recipe>-<profile>/` holds the final artifact's bundle in
`bundle/`; results go to `RUN_DIR/profile/<device>.json` (and `all.json` for
profile-all). Errors are InputError/DeviceError: the main CLI prints one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from edgeopt.errors import InputError
from edgeopt.fileio import write_json
from edgeopt.profiler.inventory import Device, Inventory, load_inventory
from edgeopt.profiler.runners import RUNNERS, profile_bundle
from edgeopt.profiler.ssh import DeviceError

# profile runtime name → packages that provide it on a device
RUNTIME_PACKAGES = {
    "tflite": ("ai-edge-litert", "tflite-runtime"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt",),
    "executorch": ("executorch",),
}
# opt-in runtimes: only `format: pte` uses ExecuTorch, so a board without it still passes `devices check`
OPTIONAL_RUNTIMES = ("executorch",)

_INVENTORY_KEY = "edgeopt.profiler.inventory"


def _console() -> Console:
    from edgeopt.console import shared_console

    return shared_console()


def run_bundle(run_dir: Path) -> Path:
    """`RUN_DIR/bundle`, or RUN_DIR itself when it is a bundle."""
    run_dir = Path(run_dir)
    if (run_dir / "meta.json").is_file():
        return run_dir
    if (run_dir / "bundle" / "meta.json").is_file():
        return run_dir / "bundle"
    raise InputError(f"no bundle in {run_dir}: run the pipeline first (it writes {run_dir}/bundle)")


def _timing_options(fn: Any) -> Any:
    options = [
        click.option("--runs", default=50, type=click.IntRange(min=1), show_default=True, help="minimum timed runs"),
        click.option("--min-seconds", default=1.0, type=click.FloatRange(min=0), show_default=True, help="minimum timed seconds"),
        click.option("--max-seconds", default=150.0, type=click.FloatRange(min=0, min_open=True), show_default=True, help="stop timing after this long"),
        click.option("--warmup", default=5, type=click.IntRange(min=0), show_default=True, help="untimed warm-up runs"),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="override the bundle's thread count"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group("devices")
@click.option("--inventory", type=click.Path(path_type=Path), default=None,
              help="inventory YAML (default: $EDGEOPT_INVENTORY or devices/inventory.yaml)")
@click.pass_context
def devices(ctx: click.Context, inventory: Path | None) -> None:
    """Edge devices: list, check, deploy and profile."""
    ctx.meta[_INVENTORY_KEY] = inventory  # ctx.obj belongs to the main CLI


def _inventory(ctx: click.Context) -> Inventory:
    return load_inventory(ctx.meta.get(_INVENTORY_KEY))


@devices.command("list")
@click.pass_context
def list_devices(ctx: click.Context) -> None:
    """Show the inventory."""
    table = Table("name", "host", "user", "port", "profile", "runner", "workdir", "python")
    for d in _inventory(ctx).devices:
        table.add_row(d.name, d.host, d.user or "-", str(d.port or "-"), d.profile, d.runner, d.workdir, d.python)
    _console().print(table)


def _missing_runtimes(device: Device, installed: dict[str, str]) -> list[str] | None:
    """Runtimes the device's profile wants but the device lacks; None if the profile is unknown."""
    from edgeopt.profiles import load_profile

    try:
        wanted = load_profile(device.profile).runtimes
    except InputError:
        return None
    return [r for r in wanted if r not in OPTIONAL_RUNTIMES and not any(p in installed for p in RUNTIME_PACKAGES[r])]


def _executorch_row(facts: dict) -> str:
    """Whether the board runs .pte bundles: ExecuTorch (+ torch) and the op libraries built for it."""
    runtimes = facts.get("runtimes", {})
    if "executorch" not in runtimes:
        return "not installed (format pte only; devices/setup-rpi-os.sh with EDGEOPT_PTE=1 installs it)"
    libraries = facts.get("op_libraries") or {}
    built = ", ".join(f"{name} {'ok' if lib.get('usable') else 'STALE (built for executorch ' + str(lib.get('executorch')) + ')'}"
                      for name, lib in sorted(libraries.items()))
    return f"{runtimes['executorch']} (torch {runtimes.get('torch', 'missing')}); op libraries: {built or 'none built'}"


@devices.command("check")
@click.argument("name")
@click.pass_context
def check(ctx: click.Context, name: str) -> None:
    """Reach NAME and report arch, Python, runtimes and free memory."""
    device = _inventory(ctx).get(name)
    facts = RUNNERS.get(device.runner)().facts(device)
    runtimes = facts.get("runtimes", {})
    temps = facts.get("temperature_c") or {}
    emulated = facts.get("emulated")
    if emulated:
        arch = (f"{facts.get('arch')} (emulated: {emulated['emulator']}, cpu {emulated.get('cpu')}, "
                f"on {emulated['host_arch']})")
    else:
        arch = f"{facts.get('arch')}{' (emulated: inventory)' if device.emulated else ''}"
    rows = {
        "reachable": f"yes ({device.runner})",
        "arch": arch,
        "board / cpu": f"{facts.get('board') or '-'} / {facts.get('cpu_model')} x{facts.get('cores')}",
        "python": f"{facts.get('python')} ({facts.get('python_executable')})",
        "runtimes": ", ".join(f"{k} {v}" for k, v in sorted(runtimes.items())) or "none",
        "executorch": _executorch_row(facts),
        "free memory": f"{facts.get('mem_available_mb')} / {facts.get('mem_total_mb')} MB",
        "governor": facts.get("governor") or "-",
        "temperature": f"{max(temps.values()):.1f} C" if temps else "-",
        "power mode": facts.get("jetson_power_mode") or "-",
    }
    if emulated:
        rows["emulated"] = f"{emulated['host_facts']}; latency and memory are not device figures"
    console = _console()
    for key, value in rows.items():
        console.print(f"{key:>12}: {value}", highlight=False)
    missing = _missing_runtimes(device, runtimes)
    if missing is None:
        console.print(f"{'profile':>12}: '{device.profile}' unknown, runtimes not checked", highlight=False)
    elif missing:
        raise DeviceError(f"device '{name}' lacks runtime(s) {', '.join(missing)} required by profile "
                          f"'{device.profile}': run devices/setup-*.sh on it")


@devices.command("deploy")
@click.argument("name")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.pass_context
def deploy(ctx: click.Context, name: str, run_dir: Path) -> None:
    """Copy RUN_DIR's bundle to device NAME."""
    device = _inventory(ctx).get(name)
    where = RUNNERS.get(device.runner)().deploy(run_bundle(run_dir), device)
    click.echo(f"deployed {run_bundle(run_dir)} to {device.name}:{where}")


def _summary(result: dict[str, Any]) -> dict[str, str]:
    if "error" in result:
        return {"error": result["error"]}
    lat, facts = result["latency_ms"], result["device"]
    emulated = " (emulated)" if result.get("emulated") else ""  # the emulator's time, not the device's
    return {
        "emulated": "yes: latency and memory are not device figures" if emulated else "no",
        "runtime": f"{result['runtime']} {result['runtime_version']}",
        "threads / batch": f"{result['threads']} / {result['batch_size']}",
        "latency mean ms" + emulated: f"{lat['mean']:.3f}",
        "latency p10 ms" + emulated: f"{lat['p10']:.3f}" if "p10" in lat else "-",
        "latency p50 ms" + emulated: f"{lat['p50']:.3f}",
        "latency p90 ms" + emulated: f"{lat['p90']:.3f}",
        "latency p99 ms" + emulated: f"{lat['p99']:.3f}",
        "runs": str(result["runs"]),
        "init ms": f"{result['init_ms']:.1f}",
        "peak RSS MB" + emulated: f"{result['peak_rss_mb']:.1f}",
        (result["accuracy"] or {}).get("metric", "top-1"):
            f"{100 * (result['accuracy'] or {}).get('value', (result['accuracy'] or {}).get('top1', 0.0)):.2f}%"
            if result.get("accuracy") else "-",
        "cpu": f"{facts.get('cpu_model')} x{facts.get('cores')} ({facts.get('arch')})",
    }


def _print_side_by_side(results: dict[str, dict[str, Any]]) -> None:
    summaries = {name: _summary(r) for name, r in results.items()}
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))
    table = Table("", *summaries)
    for key in keys:
        table.add_row(key, *(s.get(key, "-") for s in summaries.values()))
    _console().print(table)


def _profile_one(device: Device, bundle: Path, timing: dict[str, Any]) -> dict[str, Any]:
    """Profile and save to `<run dir>/profile/<device>.json` (next to the bundle, never inside it)."""
    result = profile_bundle(bundle, device=device, **timing)
    write_json(bundle.parent / "profile" / f"{device.name}.json", result)
    return result


@devices.command("profile")
@click.argument("name")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_timing_options
@click.pass_context
def profile(ctx: click.Context, name: str, run_dir: Path, **timing: Any) -> None:
    """Profile RUN_DIR's bundle on device NAME; writes RUN_DIR/profile/NAME.json."""
    device = _inventory(ctx).get(name)
    result = _profile_one(device, run_bundle(run_dir), timing)
    _print_side_by_side({device.name: result})


@devices.command("profile-all")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_timing_options
@click.pass_context
def profile_all(ctx: click.Context, run_dir: Path, **timing: Any) -> None:
    """Profile RUN_DIR's bundle on every inventory device, results side by side.

    A device that fails is reported in its column and in all.json; the others still run.
    """
    bundle = run_bundle(run_dir)
    inventory = _inventory(ctx)
    if not inventory.devices:
        raise InputError("the device inventory is empty: add devices to devices/inventory.yaml")
    results: dict[str, dict[str, Any]] = {}
    for device in inventory.devices:
        try:
            results[device.name] = _profile_one(device, bundle, timing)
        except InputError as exc:
            results[device.name] = {"error": str(exc)}
    write_json(bundle.parent / "profile" / "all.json", results)
    _print_side_by_side(results)
    failed = [name for name, r in results.items() if "error" in r]
    if failed:
        raise DeviceError(f"{len(failed)} of {len(results)} devices failed: {', '.join(failed)} "
                          f"(see {bundle.parent / 'profile' / 'all.json'})")
