"""The CLI's rich consoles: the terminal's width on a terminal, 160 columns in pipes and CI logs
(rich would assume 80 and wrap every table; `COLUMNS` overrides), and log lines without a
`file.py:NN` suffix. `shared_console()` is the one the CLI prints to: progress bars join its
status spinner there (rich nests live displays on one console) instead of fighting it."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Iterator

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 160
    return Console(stderr=stderr, width=width, log_path=False)


@functools.cache
def shared_console() -> Console:
    """The standard-output console of the CLI (created on first use)."""
    return make_console()


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """Hide what third-party libraries print while they load: TensorFlow's absl banners (pulled in
    by litert-torch and ai-edge-quantizer) go straight to file descriptor 2 from C++, torchao's
    missing-CUDA-kernel warnings and torch's pytree notices through logging. The CLI's output is
    for people; `edgeopt --debug` (EDGEOPT_DEBUG=1) shows everything."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("EDGEOPT_DEBUG"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
