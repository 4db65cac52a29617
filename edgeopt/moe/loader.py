"""The loader threads: read expert records off the store while the main thread computes.

A priority queue rather than `ThreadPoolExecutor`'s FIFO, because a demand read (the
layer is waiting on it) must overtake queued prefetches, and a prefetch that turned
out to be unneeded must be cancellable before it wastes device bandwidth.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future

DEMAND, PREFETCH = 0, 1


class Loader:
    def __init__(self, read: Callable, workers: int = 2, name: str = "expert-loader") -> None:
        self._read = read
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        # Two workers: a demand read never waits for a prefetch that is already being read.
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, priority: int, *args) -> Future:
        fut: Future = Future()
        self._push(priority, fut, args)
        return fut

    def promote(self, fut: Future, *args) -> None:
        """Move a queued request to the front (its older queue entry is skipped when reached)."""
        if not (fut.running() or fut.done()):
            self._push(DEMAND, fut, args)

    def _push(self, priority: int, fut: Future, args: tuple) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("loader is closed")
            heapq.heappush(self._heap, (priority, next(self._order), fut, args))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, fut, args = heapq.heappop(self._heap)
                # Claimed under the lock, so two workers never run the same request.
                if fut.running() or fut.done() or not fut.set_running_or_notify_cancel():
                    continue  # already served through a promoted entry, or cancelled
            try:
                fut.set_result(self._read(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)

    def close(self) -> None:
        with self._cv:
            for _, _, fut, _ in self._heap:
                fut.cancel()
            self._heap.clear()
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()
