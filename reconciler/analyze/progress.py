"""Progress lines on stderr for long runs: one line per finished module, with an estimate
of the time left. Plain lines, so logs and CI output stay readable."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def note(self, message: str) -> None:
        if self.enabled:
            with self._lock:
                print(f"analyze: {message}", file=self.stream, flush=True)

    def step(self, what: str, status: str, seconds: float) -> None:
        with self._lock:
            self.done += 1
            if not self.enabled:
                return
            elapsed = time.monotonic() - self.started
            left = elapsed / self.done * (self.total - self.done)
            eta = f", about {left:.0f}s left" if self.done < self.total else ""
            print(
                f"analyze: [{self.done}/{self.total}] {what}: {status} ({seconds:.1f}s{eta})",
                file=self.stream, flush=True,
            )  # fmt: skip
