"""The report of a run, built once from its steps; every renderer only reads it.

`report.json` is this model dumped. It says where the figures were measured: a
`rpi5` or `jetson-*` run without `--device` times the bundle on this host, so its
latency and memory budgets are "not measured" rather than judged from host figures.
Each latency carries its p10–p90 spread, and a speed-up inside the spread is flagged.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from edgeopt.errors import InputError
from edgeopt.profiles import Profile

if TYPE_CHECKING:
    from edgeopt.pipeline import StepResult

REPORT_JSON = "report.json"
DEFAULT_METRIC = "top-1"
# budgets that only mean something on the profile's own hardware
DEVICE_BUDGETS = ("max_latency_ms", "max_peak_memory_mb")
Status = Literal["ok", "MISSED", "not measured"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Latency(_Model):
    """Milliseconds per inference; p10 and p90 give the spread."""

    p50: float
    p90: float
    p10: float | None = None
    p99: float | None = None
    mean: float | None = None
    samples: list[float] = []

    @model_validator(mode="before")
    @classmethod
    def _p10_from_samples(cls, stats: Any) -> Any:
        """Results recorded before the agent gave p10 still carry their raw samples."""
        if isinstance(stats, dict) and stats.get("p10") is None and stats.get("samples"):
            import numpy as np

            stats = {**stats, "p10": float(np.percentile(stats["samples"], 10))}
        return stats

    @classmethod
    def from_profile(cls, stats: dict[str, Any]) -> Latency:
        return cls.model_validate(stats)

    @property
    def low(self) -> float:
        return self.p10 if self.p10 is not None else self.p50

    def overlaps(self, other: Latency) -> bool:
        """Whether the two p10–p90 ranges overlap: the difference is within the timing noise."""
        return self.low <= other.p90 and other.low <= self.p90


class Step(_Model):
    step: str
    pass_name: str = Field(alias="pass")
    format: str
    precision: str
    runtime: str
    params: int | None = None
    size_mb: float
    accuracy: float  # the task metric as a fraction (top-1, mAP50, ...)
    accuracy_drop_points: float  # original − this step, in points: positive is a drop
    latency_ms: Latency
    speedup_vs_original: float
    within_noise: bool = False  # the latency difference to the original is inside the p10–p90 spread
    size_ratio_vs_original: float | None = None
    init_ms: float | None = None
    peak_rss_mb: float | None = None
    cached: bool = False
    wall_s: float | None = None
    pass_metrics: dict[str, Any] = {}

    @computed_field
    @property
    def delta_points(self) -> float:
        """This step − the original, in points: a drop is negative."""
        return -self.accuracy_drop_points


class Budget(_Model):
    measured: float
    limit: float
    ok: bool | None  # None: not measured (host figures for a device budget)
    status: Status | None = None

    def model_post_init(self, __context: Any) -> None:
        if self.status is None:
            self.status = "not measured" if self.ok is None else ("ok" if self.ok else "MISSED")


class Measurement(_Model):
    """Where the latency and memory figures come from."""

    on_device: bool
    where: str  # "x86_64 host" or "device 'rpi5'"
    label: str  # shown in titles: "measured on x86_64 host, not on the device"
    notes: list[str] = []
    emulated: bool = False  # under qemu-user: latency and memory are the emulator's


class Environment(_Model):
    date: str
    edgeopt: str
    host: str | None = None
    arch: str | None = None
    cpu: str | None = None
    os: str | None = None
    python: str | None = None
    runtimes: dict[str, str] = {}  # the runtimes that timed the steps, with versions
    toolchain: dict[str, str] = {}  # torch, onnx, exporters on the host that built the artifacts


class DeviceResult(_Model):
    """The final bundle profiled on an inventory device (`edgeopt devices profile`), or its error."""

    name: str
    runtime: str | None = None
    runtime_version: str | None = None
    latency_ms: Latency | None = None
    accuracy: float | None = None
    peak_rss_mb: float | None = None
    arch: str | None = None
    error: str | None = None

    @classmethod
    def from_result(cls, name: str, result: dict[str, Any]) -> DeviceResult:
        if "error" in result:
            return cls(name=name, error=str(result["error"]))
        return cls(name=name, runtime=result.get("runtime"), runtime_version=result.get("runtime_version"),
                   latency_ms=Latency.from_profile(result["latency_ms"]),
                   accuracy=_primary_metric(result), peak_rss_mb=result.get("peak_rss_mb"),
                   arch=(result.get("device") or {}).get("arch"))


class Report(_Model):
    recipe: str
    profile: str
    metric: str = DEFAULT_METRIC
    measurement: Measurement | None = None  # None in reports written before edgeopt recorded it
    environment: Environment | None = None
    steps: list[Step] = Field(min_length=1)
    budgets: dict[str, Budget] = {}
    passed: bool
    devices: list[DeviceResult] = []

    @property
    def title(self) -> str:
        where = f" ({self.measurement.label})" if self.measurement else ""
        return f"{self.recipe} on {self.profile}{where}"

    def with_devices(self, devices: list[DeviceResult]) -> Report:
        return self.model_copy(update={"devices": devices})

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def measurement(profile: Profile, result: dict[str, Any], bundle_runtime: str | None = None) -> Measurement:
    """Where `result` (a profiler JSON) was taken, judged against the profile's hardware.

    `bundle_runtime`: what the run's deployable bundle runs with on the device (default: the
    profile's first runtime); a TensorRT bundle timed here with another runtime says so.
    """
    target = result.get("target") or {}
    facts = result.get("device") or {}
    arch = facts.get("arch") or platform.machine()
    remote = target.get("device") not in (None, "localhost")
    same_hardware = arch == profile.arch and profile.accelerator.kind == "none"
    notes = []
    runtime = result.get("runtime")
    if (bundle_runtime or profile.runtimes[0]) == "tensorrt" and runtime != "tensorrt":
        notes.append(f"the {profile.name} bundle runs with TensorRT on the device; these figures were timed "
                     f"with {runtime}")
    if result.get("emulated"):  # qemu-user: the emulator's time and memory, never the device's
        where = f"emulated board '{target.get('device', '?')}'"
        notes.append("latency and memory under qemu-user emulation are not device figures: they are not "
                     "checked against budgets or compared with other hosts; accuracy is real")
        return Measurement(on_device=False, where=where, label=f"measured on an {where} ({arch}), not on the device",
                           notes=notes, emulated=True)
    if remote:
        where = f"device '{target['device']}'"
        return Measurement(on_device=True, where=where, label=f"measured on {where} ({arch})", notes=notes)
    if same_hardware:
        return Measurement(on_device=True, where=f"{arch} host", label=f"measured on this {arch} host", notes=notes)
    notes.append(f"{profile.name}'s latency and memory budgets are not judged from host figures: "
                 f"profile the bundle on the board (`edgeopt devices profile`) or pass --device")
    return Measurement(on_device=False, where=f"{arch} host", label=f"measured on {arch} host, not on the device",
                       notes=notes)


def build_report(recipe: str, profile: Profile, steps: list[StepResult], checks: dict[str, dict[str, Any]],
                 bundle_runtime: str | None = None) -> Report:
    """The report of a pipeline run (`checks`: pipeline.verdict; `bundle_runtime`: see `measurement`)."""
    base = steps[0].metrics
    base_latency = Latency.from_profile(base["profile"]["latency_ms"])
    where = measurement(profile, steps[-1].metrics["profile"], bundle_runtime)
    rows, params = [], None
    for step in steps:
        m = step.metrics
        params = m.get("params", params)  # an export keeps its PyTorch step's parameters
        latency = Latency.from_profile(m["profile"]["latency_ms"])
        rows.append(Step(
            step=step.dir.name, pass_name=step.name, format=m["format"], precision=m["precision"],
            runtime=m["runtime"], params=params, size_mb=m["size_mb"], accuracy=m["accuracy"],
            accuracy_drop_points=100.0 * (base["accuracy"] - m["accuracy"]), latency_ms=latency,
            speedup_vs_original=base_latency.p50 / latency.p50,
            within_noise=step is not steps[0] and latency.overlaps(base_latency),
            size_ratio_vs_original=base["size_mb"] / m["size_mb"], init_ms=m["profile"].get("init_ms"),
            peak_rss_mb=m["profile"].get("peak_rss_mb"), cached=step.cached, wall_s=step.wall_s,
            pass_metrics=m.get("pass", {}),
        ))
    budgets = {
        name: Budget(measured=c["measured"], limit=c["limit"],
                     ok=None if name in DEVICE_BUDGETS and not where.on_device else c["ok"])
        for name, c in checks.items()
    }
    return Report(
        recipe=recipe, profile=profile.name, metric=base.get("metric") or DEFAULT_METRIC, measurement=where,
        environment=environment(steps), steps=rows, budgets=budgets,
        passed=all(b.ok is not False for b in budgets.values()),
    )


def environment(steps: list[StepResult]) -> Environment:
    from edgeopt import __version__
    from edgeopt.pipeline import toolchain_versions

    result = steps[-1].metrics["profile"]
    facts = result.get("device") or {}
    runtimes = {}
    for step in steps:
        profiled = step.metrics["profile"]
        if profiled.get("runtime"):
            runtimes[profiled["runtime"]] = str(profiled.get("runtime_version", "?"))
    return Environment(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), edgeopt=__version__,
        host=facts.get("hostname"), arch=facts.get("arch"), cpu=facts.get("cpu_model"), os=facts.get("os"),
        python=facts.get("python"), runtimes=runtimes, toolchain=toolchain_versions(),
    )


def load_report(run_dir: Path) -> Report:
    """RUN_DIR/report.json, validated; a missing or malformed one is a one-line InputError."""
    from edgeopt.fileio import read_json

    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise InputError(f"no {REPORT_JSON} in {run_dir}: run `edgeopt optimize` first")
    data = read_json(path)
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise InputError(f"{path}: not a complete edgeopt report ({where}: {first['msg'].lower()}); "
                         f"re-run `edgeopt optimize` to rewrite it") from None


def load_devices(run_dir: Path) -> list[DeviceResult]:
    """Device results beside the run (`profile/<device>.json`), and the failures `profile-all` recorded."""
    from edgeopt.fileio import read_json

    folder = Path(run_dir) / "profile"
    found: dict[str, DeviceResult] = {}
    everything = folder / "all.json"
    if everything.is_file():
        for name, result in read_json(everything).items():
            if isinstance(result, dict):
                found[name] = DeviceResult.from_result(name, result)
    for path in sorted(folder.glob("*.json")):
        if path.stem == "all":
            continue
        failed_since = everything.is_file() and everything.stat().st_mtime > path.stat().st_mtime
        if not (failed_since and found.get(path.stem) and found[path.stem].error):
            found[path.stem] = DeviceResult.from_result(path.stem, read_json(path))
    return list(found.values())


def _primary_metric(result: dict[str, Any]) -> float | None:
    """A device result's primary metric (top-1, or a detector's mAP50) in [0, 1]."""
    accuracy = result.get("accuracy") or {}
    return accuracy.get("value", accuracy.get("top1"))
