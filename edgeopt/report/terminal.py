"""The report on a terminal (rich): steps, budgets, device results, notes; fits 80 columns.

Rich shrinks a too-wide table by folding cells anywhere ("0.00\\n5"); here a narrow
terminal gets column widths that break cells only at spaces ("torch fp32" over two lines,
"size MB" as a two-line header), so numbers stay whole.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from edgeopt.report.cells import Table, budgets_table, devices_table, environment_line, notes, steps_table
from edgeopt.report.model import Report

STATUS_STYLE = {"ok": "green", "MISSED": "red", "REGRESSION": "red", "not measured": "yellow", "failed": "red"}
GAP = 2  # characters between columns (collapsed padding + the box's space)
MIN_TEXT = 6  # narrowest a folded name column gets


def column_widths(table: Table, width: int) -> list[int] | None:
    """Widths that fit `width`, or None when the natural widths already fit."""
    cells = [[row[i] for row in table.rows] + [table.columns[i]] for i in range(len(table.columns))]
    natural = [max(len(line) for cell in column for line in cell.splitlines() or [""]) for column in cells]
    available = width - GAP * (len(natural) - 1)
    if sum(natural) <= available:
        return None
    widths = [max(len(word) for cell in column for word in cell.split() or [""]) for column in cells]
    if sum(widths) > available:  # even whole words do not fit: names fold, numbers stay whole
        text = range(table.left)
        room = max(available - sum(widths[table.left:]), MIN_TEXT * table.left)
        share = sum(widths[i] for i in text)
        for i in text:
            widths[i] = max(MIN_TEXT, min(widths[i], room * widths[i] // share))
        return widths
    leftover = available - sum(widths)
    for i in sorted(range(len(widths)), key=lambda i: natural[i] - widths[i]):
        extra = max(0, min(natural[i] - widths[i], leftover))
        widths[i] += extra
        leftover -= extra
    return widths


def rich_table(table: Table, width: int, title: str | None = None, styled: int | None = None) -> RichTable:
    out = RichTable(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False,
                    show_edge=False, title_justify="left")
    widths = column_widths(table, width)
    for i, column in enumerate(table.columns):
        out.add_column(column, justify="left" if i < table.left else "right", overflow="fold",
                       width=widths[i] if widths else None)
    for row in table.rows:
        cells = list(row)
        if styled is not None and cells[styled] in STATUS_STYLE:
            cells[styled] = f"[{STATUS_STYLE[cells[styled]]}]{cells[styled]}[/]"
        out.add_row(*cells)
    return out


def print_report(report: Report, console: Console) -> None:
    width = console.width
    console.print(rich_table(steps_table(report), width, title=report.title))
    if report.budgets:
        console.print(rich_table(budgets_table(report), width, title="budgets", styled=3))
    if report.devices:
        console.print(rich_table(devices_table(report.devices), width, title="final bundle on devices", styled=1))
    for line in notes(report):
        console.print(line, style="dim", highlight=False)
    if environment_line(report):
        console.print(environment_line(report), style="dim", highlight=False)
