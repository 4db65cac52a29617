"""The shared, content-addressed step cache, and `edgeopt cache info|clear`.

A pass's output depends only on its input artifact, config and code (the pipeline's step key),
so an entry computed once serves every run directory and every profile the pass ignores. The
cache lives in one place per user: `$EDGEOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/edgeopt/steps`,
else `~/.cache/edgeopt/steps`. Every entry records the SHA-256 of its files; an entry that fails
the check (a truncated weight file, a bad `entry.json`) is removed with a warning and the step is
recomputed, so a damaged cache never blocks a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgeopt.artifact import ModelArtifact
from edgeopt.fileio import write_json

ENV = "EDGEOPT_CACHE_DIR"
ENTRY = "entry.json"
# Not part of an entry: the run's own manifest, its profiling exports, a pass's resume checkpoint.
IGNORED = ("manifest.json", "profiled", "resume.pt")


def default_cache_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeopt" / "steps"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ENTRY}  # fmt: skip


@dataclass
class StepCache:
    root: Path
    warn: Callable[[str], None] = lambda message: None

    def store(self, key: str, step_dir: Path, artifact: ModelArtifact, pass_metrics: dict[str, Any],
              wall_s: float) -> None:  # fmt: skip
        """Copy a finished step in; built in a unique temp dir and renamed, so racing runs are safe."""
        entry = self.root / key
        if entry.exists():
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        except OSError as exc:
            self.warn(f"warning: step cache {self.root} is not writable ({exc.strerror}); step not cached")
            return
        try:
            shutil.copytree(step_dir, tmp, ignore=shutil.ignore_patterns(*IGNORED), dirs_exist_ok=True)
            record = {"artifact": artifact.to_json(), "relative": str(artifact.path.relative_to(step_dir)),
                      "pass": pass_metrics, "wall_s": wall_s, "sha256": _checksums(tmp)}  # fmt: skip
            write_json(tmp / ENTRY, record)
            os.replace(tmp, entry)
        except OSError:
            pass  # another run stored the same entry first; ours was only a copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch(self, key: str, step_dir: Path) -> tuple[ModelArtifact, dict[str, Any], float] | None:
        """The entry copied into `step_dir` as (artifact, pass metrics, wall time), or None."""
        entry = self.root / key
        if not entry.is_dir():
            return None
        problem = _problem(entry)
        if problem:
            self.warn(f"warning: step cache entry {key} is damaged ({problem}); removed, recomputing the step")
            shutil.rmtree(entry, ignore_errors=True)
            return None
        record = json.loads((entry / ENTRY).read_text())
        shutil.rmtree(step_dir, ignore_errors=True)
        shutil.copytree(entry, step_dir, ignore=shutil.ignore_patterns(ENTRY))
        artifact = ModelArtifact.from_json({**record["artifact"], "path": str(step_dir / record["relative"])})
        return artifact, record["pass"], record["wall_s"]

    def entries(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.root.is_dir() else []  # fmt: skip

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else 0

    def clear(self) -> int:
        """Remove every entry (and any temp dir an interrupted run left); returns the entries removed."""
        removed = len(self.entries())
        if self.root.is_dir():
            for path in self.root.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return removed


def _problem(entry: Path) -> str | None:
    """Why an entry cannot be trusted, or None."""
    try:
        record = json.loads((entry / ENTRY).read_text())
        expected = record["sha256"]
        record["artifact"], record["relative"], record["pass"], record["wall_s"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {ENTRY}"
    found = _checksums(entry)
    for name, digest in expected.items():
        if name not in found:
            return f"{name} missing"
        if found[name] != digest:
            return f"{name} does not match its checksum"
    return None


@click.group("cache")
def cache() -> None:
    """The shared step cache (`$EDGEOPT_CACHE_DIR`, default ~/.cache/edgeopt/steps)."""


@cache.command("info")
def cache_info() -> None:
    """Where the step cache is, how many entries it holds and their size."""
    store = StepCache(default_cache_dir())
    click.echo(f"step cache: {store.root}")
    click.echo(f"entries: {len(store.entries())}, {store.size_bytes() / 2**20:.1f} MiB")


@cache.command("clear")
def cache_clear() -> None:
    """Remove every entry; later runs recompute their steps."""
    store = StepCache(default_cache_dir())
    size = store.size_bytes()
    click.echo(f"removed {store.clear()} entries ({size / 2**20:.1f} MiB) from {store.root}")
