"""Reload the routing table when the desired-state file changes (mtime poll). Open streams
keep the backend objects they hold, so a reload never cuts them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.config.schema import DesiredState

log = logging.getLogger(__name__)


class StateWatcher:
    def __init__(self, path: str, apply: Callable[[DesiredState], None], interval: float = 1.0):
        self.path = path
        self.apply = apply
        self.interval = interval
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def poll(self) -> bool:
        """Apply the file if it changed since last time; True when a new state was applied."""
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            state, _ = load_desired_state(self.path)
        except (ConfigError, OSError, ValueError) as exc:
            log.warning(
                "desired state %s changed but is not usable; keeping the old routes: %s",
                self.path,
                exc,
            )
            return False
        self.apply(state)
        log.info("routing table reloaded from %s", self.path)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
            except Exception:  # a bad reload must not end the watching
                log.exception("reloading %s failed", self.path)
