"""Error types the CLI maps to exit codes.

`InputError` is anything the user can fix (bad path, bad YAML, unknown name):
the CLI prints its message as one line and exits 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InputError(Exception):
    """A usage or input problem; shown as one line, exit code 2."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> InputError:
    """An InputError for an unknown name that suggests the closest known one."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return InputError(f"unknown {kind} '{name}'{hint} (known: {', '.join(known) or 'none'})")
