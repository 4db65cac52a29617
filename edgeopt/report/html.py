"""A self-contained report.html: the report's tables, notes and plots (inline PNGs)."""

from __future__ import annotations

import base64
import html
import io

from edgeopt.report.cells import Table, budgets_table, devices_table, environment_line, notes, steps_table
from edgeopt.report.model import Report
from edgeopt.report.plots import figures


def _png(fig) -> str:  # noqa: ANN001
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _images(report: Report) -> str:
    import matplotlib.pyplot as plt

    parts = []
    for title, fig in figures(report).items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{_png(fig)}'>")
        plt.close(fig)
    return "".join(parts)


def to_html(report: Report) -> str:
    esc = html.escape
    verdict = "PASSED" if report.passed else "FAILED"
    sections = [f"<h1>{esc(report.title)}: {verdict}</h1>",
                "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in notes(report)) + "</ul>",
                _table(steps_table(report))]
    if report.budgets:
        sections += ["<h2>Budgets</h2>", _table(budgets_table(report))]
    if report.devices:
        sections += ["<h2>Final bundle on devices</h2>", _table(devices_table(report.devices))]
    sections.append(_images(report))
    if environment_line(report):
        sections.append(f"<p class='env'>{esc(environment_line(report))}</p>")
    body = "\n".join(sections)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeopt: {esc(report.title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{max-width:100%}}.env{{color:#666;font-size:90%}}</style>
</head><body>
{body}
</body></html>
"""
