"""Concurrency limits that refuse instead of queueing: a request over the limit gets 429
with Retry-After at once, so there is never an unbounded queue inside the gateway."""

from __future__ import annotations


class ConcurrencyLimiter:
    def __init__(self, limit: int | None):
        self.limit = limit
        self._open: dict[str, int] = {}

    def try_acquire(self, key: str) -> bool:
        if self.limit is None:
            return True
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        if self.limit is None:
            return
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
