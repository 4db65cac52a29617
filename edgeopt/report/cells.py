"""The report's tables as text cells, formatted once for the terminal, markdown and HTML.

Headers are short and cells break at spaces, so the step table fits an 80-column terminal.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeopt.report.model import DeviceResult, Latency, Report

NOISE_MARK = "≈"
NOISE_NOTE = (f"{NOISE_MARK}: the latency difference to the original is inside the p10–p90 spread "
              "(not a measurable speed-up)")


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]
    left: int = 1  # how many leading columns are text (left-aligned)


def ms(value: float | None, scale: float = 1.0) -> str:
    """Three significant digits (0.00612, 0.481, 12.3, 154); `scale` converts ms to the table's unit."""
    if value is None:
        return "—"
    value *= scale
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.{2 - int(value >= 10)}f}"


def unit(latencies: list[Latency | None]) -> tuple[str, float]:
    """µs when every figure is under a millisecond (short cells), else ms."""
    highest = max((lat.p90 for lat in latencies if lat is not None), default=1.0)
    return ("µs", 1000.0) if highest < 1.0 else ("ms", 1.0)


def spread(latency: Latency | None, scale: float = 1.0) -> str:
    if latency is None:
        return "—"
    if latency.p10 is None:
        return f"≤{ms(latency.p90, scale)}"
    return f"{ms(latency.low, scale)}–{ms(latency.p90, scale)}"


def step_names(report: Report) -> list[str]:
    """The pass names (short), or the step directories when a pass repeats."""
    names = [s.pass_name for s in report.steps]
    return names if len(set(names)) == len(names) else [s.step for s in report.steps]


def steps_table(report: Report) -> Table:
    name, scale = unit([s.latency_ms for s in report.steps])
    rows = []
    for label, s in zip(step_names(report), report.steps, strict=True):
        speedup = f"{s.speedup_vs_original:.2f}×"
        rows.append([
            label,
            f"{s.format} {s.precision}",
            f"{s.params:,}" if s.params is not None else "—",
            f"{s.size_mb:.3f}",
            f"{100 * s.accuracy:.2f}",
            f"{s.delta_points + 0.0:+.2f}",  # + 0.0: no "-0.00"
            ms(s.latency_ms.p50, scale),
            spread(s.latency_ms, scale),
            f"{NOISE_MARK}{speedup}" if s.within_noise else speedup,
            f"{s.peak_rss_mb:.0f}" if s.peak_rss_mb is not None else "—",
        ])
    columns = ["step", "format", "params", "size MB", f"{report.metric} %", "Δ pts", f"p50 {name}",
               f"p10–p90 {name}", "speed up", "peak MB"]
    return Table(columns, rows, left=2)


def budgets_table(report: Report) -> Table:
    rows = [[name, f"{b.measured:.3f}", f"{b.limit:.3f}", b.status or ""] for name, b in report.budgets.items()]
    return Table(["budget", "measured", "limit", "verdict"], rows)


def devices_table(devices: list[DeviceResult]) -> Table:
    name, scale = unit([d.latency_ms for d in devices])
    rows = []
    for d in devices:
        if d.error:
            rows.append([d.name, "failed", d.error, "", "", "", ""])
            continue
        rows.append([d.name, f"{d.runtime} {d.runtime_version or ''}".strip(), d.arch or "—",
                     ms(d.latency_ms.p50 if d.latency_ms else None, scale), spread(d.latency_ms, scale),
                     f"{100 * d.accuracy:.2f}" if d.accuracy is not None else "—",
                     f"{d.peak_rss_mb:.0f}" if d.peak_rss_mb is not None else "—"])
    return Table(["device", "runtime", "arch", f"p50 {name}", f"p10–p90 {name}", "top-1 %", "peak MB"], rows, left=3)


def notes(report: Report) -> list[str]:
    """What the reader must know to read the figures right."""
    out = []
    if report.measurement:
        out.append(f"Latency and memory {report.measurement.label}.")
        out += report.measurement.notes
    out.append("Latency: p50 per inference, p10–p90 its spread over the timed runs; PyTorch steps are timed "
               "as their fp32 export in the profile's format, so rows compare like with like.")
    if any(s.within_noise for s in report.steps):
        out.append(NOISE_NOTE)
    return out


def environment_line(report: Report) -> str:
    env = report.environment
    if env is None:
        return ""
    runtimes = ", ".join(f"{k} {v}" for k, v in env.runtimes.items())
    toolchain = ", ".join(f"{k} {v}" for k, v in env.toolchain.items() if k in ("torch", "onnx"))
    parts = [env.date, f"edgeopt {env.edgeopt}", f"host {env.host or '?'} ({env.arch or '?'}, {env.cpu or '?'})",
             runtimes, toolchain]
    return "; ".join(p for p in parts if p)
