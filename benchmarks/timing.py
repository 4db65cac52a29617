"""Timing shared by the benchmark scripts (run them as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` calls after one warm-up, in ms: the least noisy figure on a shared host."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median of `runs` calls after `warmup` calls, in ms: the profiler's latency figure (p50)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3
