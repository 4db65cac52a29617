"""Atomic file writes: a crash or an error never leaves a half-written artifact.

Also the checks made before long work: that an output directory is writable, and that no
other edgeopt run is using it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """A JSON file, or a one-line InputError naming it."""
    from edgeopt.errors import InputError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON (line {exc.lineno}): {exc.msg}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_json(target: Path, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_with(target: Path, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmp_path)` and move the result to `target` only if it succeeds."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def writable_dir(directory: Path, option: str = "--out") -> Path:
    """Create `directory` if needed and prove it takes files, before any long work starts."""
    from edgeopt.errors import InputError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to {option} {directory}: {exc.strerror or exc}") from None
    return directory


LOCK_FILE = ".edgeopt.lock"


@contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold an advisory lock (fcntl) on `directory` so a second run on it refuses in one line
    instead of redoing the work and racing on the same files. The kernel drops the lock when
    the process ends, however it ends."""
    from edgeopt.errors import InputError

    directory = writable_dir(directory)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{directory} is in use by another edgeopt run; wait for it or choose another --out") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
