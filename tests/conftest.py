"""Shared fixtures: the repository paths and a CLI runner."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent

# Tests never read or fill the user's step cache (~/.cache/edgeopt/steps): one per session.
os.environ["EDGEOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgeopt-test-cache-")


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def cli_runner() -> CliRunner:
    return CliRunner()
