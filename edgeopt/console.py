"""The CLI's rich consoles: the terminal's width on a terminal, 160 columns in pipes and CI logs
(rich would assume 80 and wrap every table), and log lines without a `file.py:NN` suffix."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 160
    return Console(stderr=stderr, width=width, log_path=False)
