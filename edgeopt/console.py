"""The CLI's rich consoles: the terminal's width on a terminal, 160 columns in pipes and CI logs
(rich would assume 80 and wrap every table; `COLUMNS` overrides), and log lines without a
`file.py:NN` suffix. `shared_console()` is the one the CLI prints to: progress bars join its
status spinner there (rich nests live displays on one console) instead of fighting it."""

from __future__ import annotations

import functools
import os
import sys

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 160
    return Console(stderr=stderr, width=width, log_path=False)


@functools.cache
def shared_console() -> Console:
    """The standard-output console of the CLI (created on first use)."""
    return make_console()
