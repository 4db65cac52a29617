"""A byte-budgeted expert cache with separate high- and low-precision pools.

Which entry to evict is the replacement policy's business (`Replacement.scorer`:
lowest goes first); pinned entries (experts predicted for the next layers) are never
evicted. An entry that cannot fit without evicting a pinned one is simply not cached,
so `used_bytes <= capacity` holds for each pool at all times.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeopt.moe.store import HIGH_PRECISIONS, LoadedExpert

Key = tuple[int, int]  # (layer, expert)


class Pool:
    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.entries: dict[Key, LoadedExpert] = {}
        self.used = 0

    def remove(self, key: Key) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.used -= entry.nbytes


class ExpertCache:
    def __init__(self, high_bytes: int, low_bytes: int, scorer: Callable[[bool], Callable[[Key], float]]) -> None:
        self.high = Pool(high_bytes)
        self.low = Pool(low_bytes)
        self.scorer = scorer  # scorer(high pool?) -> priority of a key now
        self.pinned: set[Key] = set()
        self.peak_used = 0

    @property
    def capacity(self) -> int:
        return self.high.capacity + self.low.capacity

    @property
    def used(self) -> int:
        return self.high.used + self.low.used

    def get(self, key: Key, allow_low: bool) -> LoadedExpert | None:
        """The high-precision copy if cached, else the low one when `allow_low`."""
        entry = self.high.entries.get(key)
        if entry is None and allow_low:
            entry = self.low.entries.get(key)
        return entry

    def contains(self, key: Key, precision: str) -> bool:
        return key in (self.high if precision in HIGH_PRECISIONS else self.low).entries

    def put(self, key: Key, entry: LoadedExpert) -> bool:
        """Insert, evicting lowest-priority unpinned entries of the same pool; False if it does not fit."""
        is_high = entry.precision in HIGH_PRECISIONS
        pool = self.high if is_high else self.low
        if key in pool.entries:
            return True
        if entry.nbytes > pool.capacity:
            return False
        need = pool.used + entry.nbytes - pool.capacity
        victims = []
        if need > 0:  # scoring every entry is the cost of a put; a pool with room needs none
            candidates = sorted((k for k in pool.entries if k not in self.pinned), key=self.scorer(is_high))
            for k in candidates:
                if need <= 0:
                    break
                victims.append(k)
                need -= pool.entries[k].nbytes
            if need > 0:
                return False
        for k in victims:
            pool.remove(k)
        pool.entries[key] = entry
        pool.used += entry.nbytes
        if is_high:
            self.low.remove(key)  # the high copy supersedes it
        self.peak_used = max(self.peak_used, self.used)
        assert self.high.used <= self.high.capacity and self.low.used <= self.low.capacity
        return True
