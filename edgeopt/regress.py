"""CI regression per hardware profile: every recipe × every profile this host can run.

Compared with committed baselines (`targets/baselines.json`):
- top-1 accuracy of the final artifact (may not fall more than `ACCURACY_TOL` points),
- its size (may not grow more than `SIZE_TOL`),
- its latency *relative to the original model's fp32 export timed in the same run*
  (absolute times differ between machines; the ratio travels).
The profile's budgets are checked too: accuracy drop and size always; absolute
latency and memory only when the profile's architecture is this host's.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeopt.errors import InputError
from edgeopt.exporters import FORMAT_RUNTIME
from edgeopt.fileio import read_json, write_json
from edgeopt.passes.export import host_format
from edgeopt.pipeline import Pipeline, StepResult, Timing, budgets_for, verdict
from edgeopt.profiles import Profile, load_profile_file, profile_paths
from edgeopt.recipes import load_recipe

ACCURACY_TOL = 0.5  # points
SIZE_TOL = 0.05  # relative
LATENCY_RATIO_TOL = 0.50  # relative; timing on shared CI machines is noisy, a real slowdown is larger

RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "tflite": "ai_edge_litert", "tensorrt": "tensorrt"}


@dataclass
class Check:
    recipe: str
    profile: str
    metric: str
    measured: float
    limit: float
    ok: bool
    source: str  # "baseline" or "budget"


def runnable_profiles(directory: Path | None = None) -> list[Profile]:
    """Profiles whose export format has its runtime installed on this host."""
    paths = profile_paths(directory) if directory else profile_paths()
    profiles = [load_profile_file(p) for p in paths.values()]
    return [p for p in profiles if importlib.util.find_spec(RUNTIME_MODULES[FORMAT_RUNTIME[host_format(p)]])]


def figures(steps: list[StepResult]) -> dict[str, float]:
    first, last = steps[0].metrics, steps[-1].metrics
    return {
        "accuracy": 100.0 * last["accuracy"],
        "size_mb": last["size_mb"],
        "latency_ratio": last["profile"]["latency_ms"]["p50"] / first["profile"]["latency_ms"]["p50"],
    }


def compare(recipe: str, profile: Profile, measured: dict[str, float], baseline: dict[str, float] | None,
            budget_checks: dict[str, dict[str, Any]]) -> list[Check]:
    checks: list[Check] = []
    if baseline:
        limits = {
            "accuracy": (baseline["accuracy"] - ACCURACY_TOL, measured["accuracy"] >= baseline["accuracy"] - ACCURACY_TOL),
            "size_mb": (baseline["size_mb"] * (1 + SIZE_TOL), measured["size_mb"] <= baseline["size_mb"] * (1 + SIZE_TOL)),
            "latency_ratio": (
                baseline["latency_ratio"] * (1 + LATENCY_RATIO_TOL),
                measured["latency_ratio"] <= baseline["latency_ratio"] * (1 + LATENCY_RATIO_TOL),
            ),
        }
        checks += [Check(recipe, profile.name, m, measured[m], lim, ok, "baseline") for m, (lim, ok) in limits.items()]
    same_arch = profile.arch == platform.machine()
    for name, check in budget_checks.items():
        if name in ("max_latency_ms", "max_peak_memory_mb") and not same_arch:
            continue  # absolute time and memory only mean something on the profile's own hardware
        checks.append(Check(recipe, profile.name, name, check["measured"], check["limit"], check["ok"], "budget"))
    return checks


def run_regression(
    targets: Path,
    baselines_path: Path,
    out: Path,
    update: bool = False,
    timing: Timing | None = None,
    only_profiles: list[str] | None = None,
    notify=lambda message: None,
) -> tuple[list[Check], dict[str, dict[str, float]]]:
    baselines = read_json(baselines_path) if baselines_path.is_file() else {}
    profiles = runnable_profiles()
    unknown = set(only_profiles or ()) - {p.name for p in profiles}
    if unknown:
        raise InputError(f"profile(s) {', '.join(sorted(unknown))} unknown or not runnable on this host "
                         f"(runnable: {', '.join(p.name for p in profiles)})")
    recipes = [load_recipe(path) for path in sorted(targets.glob("*.yaml"))]
    if not recipes:
        raise InputError(f"no recipes (*.yaml) in {targets}")
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise InputError(f"two recipes in {targets} share a name: {sorted(n for n in names if names.count(n) > 1)[0]}")
    measured_all: dict[str, dict[str, float]] = {}
    checks: list[Check] = []
    for recipe in recipes:
        for profile in profiles:
            if only_profiles and profile.name not in only_profiles:
                continue
            key = f"{recipe.name}@{profile.name}"
            run_dir = out / f"{recipe.name}-{profile.name}"
            shutil.rmtree(run_dir, ignore_errors=True)  # latency ratios must come from one fresh run
            notify(f"{key}: running")
            steps = Pipeline(recipe, profile, run_dir, timing=timing or Timing()).run()
            measured = figures(steps)
            measured_all[key] = measured
            checks += compare(recipe.name, profile, measured, None if update else baselines.get(key),
                              verdict(steps, budgets_for(recipe, profile)))
            if not update and key not in baselines:
                checks.append(Check(recipe.name, profile.name, "baseline", 0, 0, False, "missing (run --update)"))
    if update:  # keep the other pairs' baselines when only some profiles ran
        baselines.update({k: {m: round(v, 4) for m, v in fig.items()} for k, fig in measured_all.items()})
        write_json(baselines_path, baselines)
    return checks, measured_all
