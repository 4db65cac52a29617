"""The report's matplotlib figures: latency per step, metric vs latency (with devices), size per step.

Latency axes turn logarithmic when the values span a decade or more (a fp32 model next
to an int8 one on a device, or µs-scale MLPs beside ms-scale VMambas), so small values
stay readable.
"""

from __future__ import annotations

from edgeopt.report.cells import step_names
from edgeopt.report.model import Report

LOG_SPAN = 10.0  # max / min latency from which an axis is logarithmic


def latency_scale(values: list[float]) -> str:
    positive = [v for v in values if v > 0]
    return "log" if positive and max(positive) / min(positive) >= LOG_SPAN else "linear"


def figures(report: Report) -> dict:
    """Title → matplotlib Figure (the caller closes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report.steps
    names = step_names(report)  # as in the tables
    where = report.measurement.label if report.measurement else report.profile
    out = {}

    fig, ax = plt.subplots(figsize=(7, 3.2))
    samples = [s.latency_ms.samples for s in steps]
    if all(samples):
        ax.boxplot(samples, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        values = [v for s in samples for v in s]
    else:  # results without raw samples: p50 with a p10–p90 bar
        p50 = [s.latency_ms.p50 for s in steps]
        low = [s.latency_ms.p50 - s.latency_ms.low for s in steps]
        high = [s.latency_ms.p90 - s.latency_ms.p50 for s in steps]
        ax.errorbar(names, p50, yerr=[low, high], fmt="o", capsize=4)
        ax.tick_params(axis="x", rotation=20)
        values = [s.latency_ms.low for s in steps] + [s.latency_ms.p90 for s in steps]
    ax.set_yscale(latency_scale(values))
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title(f"latency per step ({where})", fontsize=10)
    out["Latency distribution"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    points = []
    for name, s in zip(names, steps, strict=True):
        lat = s.latency_ms
        ax.errorbar(lat.p50, 100 * s.accuracy, xerr=[[lat.p50 - lat.low], [lat.p90 - lat.p50]], fmt="o", capsize=3)
        ax.annotate(name, (lat.p50, 100 * s.accuracy), fontsize=8, xytext=(4, 4), textcoords="offset points")
        points.append(lat.p50)
    for d in report.devices:
        if d.error or d.latency_ms is None or d.accuracy is None:
            continue
        ax.scatter(d.latency_ms.p50, 100 * d.accuracy, marker="s", s=50)
        ax.annotate(f"{d.name} (device)", (d.latency_ms.p50, 100 * d.accuracy), fontsize=8, xytext=(4, -10),
                    textcoords="offset points")
        points.append(d.latency_ms.p50)
    ax.set_xscale(latency_scale(points))
    ax.set_xlabel(f"p50 latency, ms (bars: p10–p90; steps {where})")
    ax.set_ylabel(f"{report.metric} on eval (%)")
    ax.set_title(f"{report.metric} vs latency", fontsize=10)
    ax.grid(alpha=0.3)
    out["Accuracy vs latency"] = fig

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(names, [s.size_mb for s in steps], color="#4a7bb7")
    ax.set_ylabel("artifact size (MB)")
    ax.set_title("size per step", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    out["Size per step"] = fig
    return out
