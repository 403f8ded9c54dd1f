"""One deadline for a whole stream, as a single timer.

`asyncio.timeout_at` around every read of a stream armed and cancelled a timer per chunk
(about a third of the gateway's CPU per 34-event stream). With one timer per stream, a read
costs two attribute writes: the timer cancels the reading task only while it waits for the
backend; otherwise it marks the stream expired and the next read fails at once. Either way
the reader gets TimeoutError, as with `asyncio.timeout_at`.

    timer = StreamDeadline(loop.time() + seconds)
    timer.start_read()
    try:
        chunk = await anext(chunks, None)
    except asyncio.CancelledError:
        timer.raise_if_expired()  # TimeoutError when the cancellation was the deadline's
        raise
    finally:
        timer.reading = False
"""

from __future__ import annotations

import asyncio
from typing import Any


class StreamDeadline:
    def __init__(self, when: float):
        """`when` in the running loop's time."""
        self.expired = False
        self.reading = False
        # The task that reads the stream: the first reader. Every consumer reads a stream from
        # one task (a generator cannot be read from two at once), so it is looked up once.
        self._reader: asyncio.Task[Any] | None = None
        self._cancelled = False  # the timer cancelled the reader
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self.reading and self._reader is not None and not self._reader.done():
            self._cancelled = True
            self._reader.cancel()

    def start_read(self) -> None:
        """About to wait for the next chunk: TimeoutError if the deadline has passed."""
        if self.expired:
            raise TimeoutError
        if self._reader is None:
            self._reader = asyncio.current_task()
        self.reading = True

    def raise_if_expired(self) -> None:
        """In the reader's `except CancelledError`: TimeoutError when the deadline cancelled
        it and no one else did (the client leaving cancels the task too: that stays a
        cancellation)."""
        if self._cancelled and self._reader is not None:
            self._cancelled = False
            if self._reader.uncancel() == 0:
                raise TimeoutError from None

    def close(self) -> None:
        self._timer.cancel()
