"""A self-contained report.html: the step table plus matplotlib plots as inline PNGs.

Plots: latency distribution per artifact, accuracy vs latency across steps (and
devices, when `edgeopt devices profile-all` left results in the run), size per step.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from edgeopt.fileio import write_text
from edgeopt.report import TABLE_COLUMNS, budget_rows, table_rows


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(report: dict[str, Any], devices: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """Title → base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    names = [s["step"] for s in steps]
    out: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(7, 3.2))
    samples = [s["latency_ms"].get("samples") for s in steps]
    if all(samples):
        ax.boxplot(samples, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
    else:  # older runs without raw samples: p50 with a p90 whisker
        p50 = [s["latency_ms"]["p50"] for s in steps]
        p90 = [s["latency_ms"]["p90"] - s["latency_ms"]["p50"] for s in steps]
        ax.errorbar(names, p50, yerr=[[0] * len(p50), p90], fmt="o", capsize=4)
        ax.tick_params(axis="x", rotation=20)
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title("latency distribution per artifact")
    out["Latency distribution"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in steps:
        ax.scatter(s["latency_ms"]["p50"], 100 * s["accuracy"], s=40)
        ax.annotate(s["step"], (s["latency_ms"]["p50"], 100 * s["accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    for name, result in (devices or {}).items():
        lat, acc = result["latency_ms"]["p50"], 100 * _device_accuracy(result)
        ax.scatter(lat, acc, marker="s", s=50)
        ax.annotate(f"{name} (device)", (lat, acc), fontsize=8, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel(f"p50 latency (ms, {report['profile']})")
    ax.set_ylabel("top-1 accuracy on eval (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    out["Accuracy vs latency"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(names, [s["size_mb"] for s in steps], color="#4a7bb7")
    ax.set_ylabel("artifact size (MB)")
    ax.set_title("size per step")
    ax.tick_params(axis="x", rotation=20)
    out["Size per step"] = _png(fig)
    plt.close(fig)
    return out


def to_html(report: dict[str, Any], devices: dict[str, dict[str, Any]] | None = None) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in table_rows(report))
    budgets = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in budget_rows(report))
    figures = "".join(
        f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{data}'>"
        for title, data in plots(report, devices).items()
    )
    device_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{esc(r.get('runtime', ''))}</td><td>{r['latency_ms']['p50']:.3f}</td>"
        f"<td>{r['latency_ms']['p90']:.3f}</td><td>{100 * _device_accuracy(r):.2f}</td><td>{r['peak_rss_mb']:.0f}</td></tr>"
        for name, r in (devices or {}).items()
    )
    device_table = (
        "<h2>Final artifact on devices</h2><table><tr><th>device</th><th>runtime</th><th>p50 ms</th>"
        f"<th>p90 ms</th><th>top-1 %</th><th>peak MB</th></tr>{device_rows}</table>"
        if device_rows
        else ""
    )
    verdict = "PASSED" if report["passed"] else "FAILED"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeopt: {esc(report['recipe'])} on {esc(report['profile'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{esc(report['recipe'])} on {esc(report['profile'])}: {verdict}</h1>
<table><tr>{head}</tr>{body}</table>
<h2>Budgets</h2><table><tr><th>budget</th><th>measured</th><th>limit</th><th>verdict</th></tr>{budgets}</table>
{device_table}
{figures}
</body></html>
"""


def write_html(run_dir: Path, report: dict[str, Any], devices: dict[str, dict[str, Any]] | None = None) -> Path:
    return write_text(Path(run_dir) / "report.html", to_html(report, devices))


def _device_accuracy(result: dict) -> float:
    """A device result's primary metric (top-1 or a detector's mAP50) in [0, 1]."""
    accuracy = result.get("accuracy") or {}
    return accuracy.get("value", accuracy.get("top1", 0.0))
