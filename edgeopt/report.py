"""report.json + report.md: every step side by side with the original, and the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeopt.fileio import write_json, write_text
from edgeopt.pipeline import StepResult

REPORT_JSON = "report.json"


def build_report(
    recipe_name: str, profile_name: str, steps: list[StepResult], checks: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    base = steps[0].metrics
    rows = []
    params = None
    for step in steps:
        m = step.metrics
        params = m.get("params", params)  # an export keeps its PyTorch step's parameters
        latency = m["profile"]["latency_ms"]
        rows.append(
            {
                "step": step.dir.name,
                "pass": step.name,
                "format": m["format"],
                "precision": m["precision"],
                "runtime": m["runtime"],
                "params": params,
                "size_mb": m["size_mb"],
                "accuracy": m["accuracy"],
                "metric": m.get("metric", "top-1"),  # what `accuracy` is (top-1, mAP50)
                "accuracy_drop_points": 100.0 * (base["accuracy"] - m["accuracy"]),
                "latency_ms": latency,
                "speedup_vs_original": base["profile"]["latency_ms"]["p50"] / latency["p50"],
                "size_ratio_vs_original": base["size_mb"] / m["size_mb"],
                "init_ms": m["profile"].get("init_ms"),
                "peak_rss_mb": m["profile"].get("peak_rss_mb"),
                "cached": step.cached,
                "wall_s": step.wall_s,
                "pass_metrics": m.get("pass", {}),
            }
        )
    return {
        "recipe": recipe_name,
        "profile": profile_name,
        "metric": rows[0]["metric"] if rows else "top-1",
        "steps": rows,
        "budgets": checks,
        "passed": all(c["ok"] for c in checks.values()),
    }


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    from edgeopt.report_html import write_html

    write_json(run_dir / REPORT_JSON, report)
    write_text(run_dir / "report.md", to_markdown(report))
    write_html(run_dir, report)


def load_report(run_dir: Path) -> dict[str, Any]:
    from edgeopt.errors import InputError
    from edgeopt.fileio import read_json

    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise InputError(f"no {REPORT_JSON} in {run_dir}: run `edgeopt optimize` first")
    return read_json(path)


TABLE_COLUMNS = ["step", "format", "params", "size MB", "top-1 %", "Δ pts", "p50 ms", "p90 ms", "speedup", "peak MB"]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["steps"]:
        rows.append(
            [
                r["step"],
                f"{r['format']}/{r['precision']}",
                f"{r['params']:,}" if r["params"] is not None else "—",
                f"{r['size_mb']:.3f}",
                f"{100 * r['accuracy']:.2f}",
                f"{r['accuracy_drop_points']:+.2f}",
                f"{r['latency_ms']['p50']:.3f}",
                f"{r['latency_ms']['p90']:.3f}",
                f"{r['speedup_vs_original']:.2f}×",
                f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "—",
            ]
        )
    return rows


def budget_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [name, f"{c['measured']:.3f}", f"{c['limit']:.3f}", "ok" if c["ok"] else "MISSED"]
        for name, c in report["budgets"].items()
    ]


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# edgeopt report: {report['recipe']} on {report['profile']}",
        "",
        "Latency is measured by the profile's runtime on the profiled host; PyTorch steps are timed "
        "as their fp32 export in the profile's format, so rows compare like with like.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += ["", "## Budgets", "", "| budget | measured | limit | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in budget_rows(report)]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    return "\n".join(lines)
