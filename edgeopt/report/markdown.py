"""report.md: the same tables and notes as the terminal, in GitHub markdown."""

from __future__ import annotations

from edgeopt.report.cells import Table, budgets_table, devices_table, environment_line, notes, steps_table
from edgeopt.report.model import Report


def _table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]


def to_markdown(report: Report) -> str:
    lines = [f"# edgeopt report: {report.title}", ""]
    lines += [f"- {line}" for line in notes(report)]
    lines += ["", *_table(steps_table(report))]
    if report.budgets:
        lines += ["", "## Budgets", "", *_table(budgets_table(report))]
    if report.devices:
        lines += ["", "## Final bundle on devices", "", *_table(devices_table(report.devices))]
    verdict = "PASSED" if report.passed else "FAILED"
    lines += ["", f"**{verdict}**", ""]
    if environment_line(report):
        lines += [f"_{environment_line(report)}_", ""]
    return "\n".join(lines)
