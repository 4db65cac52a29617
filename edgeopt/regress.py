"""CI regression per hardware profile: every recipe × every profile this host can run.

Compared with committed baselines (`targets/baselines.json`):
- top-1 accuracy of the final artifact (may not fall more than `ACCURACY_TOL` points),
- its size (may not grow more than `SIZE_TOL`),
- its latency *relative to the original model's fp32 export timed in the same run*
  (absolute times differ between machines; the ratio travels, within limits).

Latency ratios are the noisy part. A ratio over its limit is re-timed with the two
bundles run alternately (`PAIRED_ROUNDS` rounds, median), so drift on a shared machine
hits both sides alike, and only a ratio that stays over the limit is a regression;
baselines are always taken that way. How fast int8 or fp16 runs next to fp32 also
depends on the CPU's instruction set (VNNI, AVX-512, NEON dot product): the baselines
record the host's ISA, and on a CPU with another ISA the ratio gets a wider tolerance
(fp32 too: XNNPACK and ORT pick other fp32 microkernels on AVX2 than on AVX-512; the CI
failure that prompted this included an fp32 low-rank MLP)
(seen: digits-vmamba's int8/fp32 ONNX ratio 1.06 on the AVX512-VNNI host that took the
baselines, 1.52 on a CI host).
The profile's budgets are checked too: accuracy drop and size always; absolute
latency and memory only when the profile's architecture is this host's.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import statistics
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
LATENCY_RATIO_TOL = 0.50  # relative, same ISA; a real slowdown is larger than timing noise
LATENCY_RATIO_TOL_OTHER_ISA = 1.0  # relative; int8/fp16 kernels differ between instruction sets
PAIRED_ROUNDS = 3
HOST_KEY = "_host"  # baselines.json entry: the ISA the latency ratios were measured on
# CPU features that change which int8/fp16/fp32 kernels a runtime picks
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_int8", "amx_bf16", "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve")

RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "tflite": "ai_edge_litert", "tensorrt": "tensorrt",
                   "executorch": "executorch"}


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


def host_isa() -> str:
    """This host's architecture and the ISA_FLAGS its CPU has (from /proc/cpuinfo; none where it is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return " ".join([platform.machine(), *(f for f in ISA_FLAGS if f in flags)])


def bundle_of(step: StepResult) -> Path:
    """The bundle the pipeline profiled this step with (the fp32 export for a PyTorch step)."""
    return step.dir / "profiled" / "bundle"


def paired_latency_ratio(first: Path, last: Path, timing: Timing, rounds: int = PAIRED_ROUNDS) -> float:
    """Median over rounds of p50(last) / p50(first), the two bundles timed back to back."""
    from edgeopt.profiler.runners import profile_bundle

    def p50(bundle: Path) -> float:
        result = profile_bundle(bundle, runs=timing.runs, min_seconds=timing.min_seconds, warmup=timing.warmup)
        return result["latency_ms"]["p50"]

    return statistics.median(p50(last) / p50(first) for _ in range(rounds))


def figures(steps: list[StepResult]) -> dict[str, float]:
    """Accuracy, size and latency ratio of the final step; no latency ratio from an emulated
    board, whose timings are the emulator's."""
    from edgeopt.profiler.runners import is_emulated

    first, last = steps[0].metrics, steps[-1].metrics
    measured = {"accuracy": 100.0 * last["accuracy"], "size_mb": last["size_mb"]}
    if not any(is_emulated(s.metrics["profile"]) for s in steps):
        measured["latency_ratio"] = last["profile"]["latency_ms"]["p50"] / first["profile"]["latency_ms"]["p50"]
    return measured


def latency_ratio_limit(baseline: dict[str, float], same_isa: bool) -> float:
    return baseline["latency_ratio"] * (1 + (LATENCY_RATIO_TOL if same_isa else LATENCY_RATIO_TOL_OTHER_ISA))


def compare(recipe: str, profile: Profile, measured: dict[str, float], baseline: dict[str, float] | None,
            budget_checks: dict[str, dict[str, Any]], same_isa: bool = True) -> list[Check]:
    checks: list[Check] = []
    if baseline:
        limits = {
            "accuracy": (baseline["accuracy"] - ACCURACY_TOL, measured["accuracy"] >= baseline["accuracy"] - ACCURACY_TOL),
            "size_mb": (baseline["size_mb"] * (1 + SIZE_TOL), measured["size_mb"] <= baseline["size_mb"] * (1 + SIZE_TOL)),
        }
        if "latency_ratio" in measured and "latency_ratio" in baseline:  # none from an emulated board
            latency_limit = latency_ratio_limit(baseline, same_isa)
            limits["latency_ratio"] = (latency_limit, measured["latency_ratio"] <= latency_limit)
        source = "baseline" if same_isa else "baseline (other ISA)"
        checks += [Check(recipe, profile.name, m, measured[m], lim, ok, source) for m, (lim, ok) in limits.items()]
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
    isa = host_isa()
    same_isa = baselines.get(HOST_KEY, isa) == isa
    if update and only_profiles and not same_isa:
        raise InputError(f"{baselines_path} was timed on ({baselines[HOST_KEY]}), this host is ({isa}): "
                         "re-take every baseline here (--update without --profile)")
    if not same_isa:
        notify(f"baselines were timed on ({baselines[HOST_KEY]}), this host is ({isa}): "
               f"latency ratios get a +{LATENCY_RATIO_TOL_OTHER_ISA:.0%} tolerance")
    timing = timing or Timing()
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
            if recipe.profiles is not None and profile.name not in recipe.profiles:
                continue  # e.g. a detector recipe made for one board
            key = f"{recipe.name}@{profile.name}"
            run_dir = out / f"{recipe.name}-{profile.name}"
            shutil.rmtree(run_dir, ignore_errors=True)  # latency ratios must come from one fresh run
            notify(f"{key}: running")
            steps = Pipeline(recipe, profile, run_dir, timing=timing).run()
            measured = figures(steps)
            baseline = None if update else baselines.get(key)
            retime = "latency_ratio" in measured and (
                update or (baseline and measured["latency_ratio"] > latency_ratio_limit(baseline, same_isa)))
            if retime:
                notify(f"{key}: timing the original and final bundles alternately")
                measured["latency_ratio"] = paired_latency_ratio(bundle_of(steps[0]), bundle_of(steps[-1]), timing)
            measured_all[key] = measured
            checks += compare(recipe.name, profile, measured, baseline, verdict(steps, budgets_for(recipe, profile)),
                              same_isa)
            if not update and key not in baselines:
                checks.append(Check(recipe.name, profile.name, "baseline", 0, 0, False, "missing (run --update)"))
    if update:  # keep the other pairs' baselines when only some profiles ran
        if not same_isa:
            baselines = {}  # latency ratios from two instruction sets cannot share one file
        baselines.update({k: {m: round(v, 4) for m, v in fig.items()} for k, fig in measured_all.items()})
        baselines[HOST_KEY] = isa
        write_json(baselines_path, baselines)
    return checks, measured_all
