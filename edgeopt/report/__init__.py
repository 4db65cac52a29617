"""A run's report: built once into `Report` (model.py) from the pipeline's steps; the terminal,
markdown and HTML renderers only read it.

    report = build_report(recipe, profile, steps, verdict(...))   # once, after optimize
    write_report(run_dir, report)                                  # report.json, .md, .html
    report = load_report(run_dir).with_devices(load_devices(run_dir))   # `edgeopt report`
"""

from __future__ import annotations

from pathlib import Path

from edgeopt.fileio import write_json, write_text
from edgeopt.report.html import to_html
from edgeopt.report.markdown import to_markdown
from edgeopt.report.model import REPORT_JSON, DeviceResult, Report, build_report, load_devices, load_report  # noqa: F401
from edgeopt.report.terminal import print_report  # noqa: F401


def write_report(run_dir: Path, report: Report) -> None:
    """report.json, report.md and report.html in `run_dir`."""
    write_json(Path(run_dir) / REPORT_JSON, report.to_json())
    write_views(run_dir, report)


def write_views(out_dir: Path, report: Report) -> Path:
    """report.md and report.html (the views; report.json is the data). Returns the HTML's path."""
    write_text(Path(out_dir) / "report.md", to_markdown(report))
    return write_text(Path(out_dir) / "report.html", to_html(report))
