"""Active health checks: probe every backend per its protocol on an interval and mark it
healthy or not in the routing table. Passive checks (failures during requests) live in the
router's circuit breaker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

from reconciler.backends.health import aprobe
from reconciler.drain import DRAINING_DETAIL, draining
from reconciler.gateway.router import Upstream

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        client: httpx.AsyncClient,
        interval: float,
        upstreams: Callable[[], Iterable[Upstream]],
        timeout: float = 2.0,
        drain_dir: Path | None = None,
    ):
        self.client = client
        self.interval = interval
        self.timeout = min(timeout, interval * 2)
        self.upstreams = upstreams
        self.first_round = asyncio.Event()
        self.drain_dir = drain_dir  # backends the reconciler is about to stop (reconciler/drain.py)
        self.draining: set[str] = set()

    async def check(self, upstream: Upstream) -> None:
        if upstream.name in self.draining:
            if upstream.healthy:
                log.info("backend %s is draining: no new requests go to it", upstream.name)
            upstream.healthy = False
            upstream.health_detail = DRAINING_DETAIL
            return
        health = await aprobe(
            self.client,
            upstream.base_url,
            upstream.protocol,
            self.timeout,
            upstream.headers,
            model=upstream.served_name,
        )
        if upstream.name in self.draining:  # marked while the probe ran
            return
        if health.ok != upstream.healthy:
            log.info("backend %s is now %s %s", upstream.name, health.state.value, health.detail)
        recovered = health.ok and not upstream.healthy
        upstream.healthy = health.ok
        upstream.health_detail = health.detail or health.state.value
        if recovered:
            # Down, then up again (a restarted process): the failures that opened its circuit
            # were the old process's, so route to it now instead of after the cooldown; the
            # prompts it cached were the old process's too.
            upstream.record_success()
            upstream.prefixes.clear()
        elif health.ok and not upstream.circuit_open:
            upstream.consecutive_failures = 0

    async def check_all(self) -> None:
        self.draining = draining(self.drain_dir)
        await asyncio.gather(*(self.check(u) for u in self.upstreams()), return_exceptions=True)

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # keep probing whatever one round did
                log.exception("health round failed")
            self.first_round.set()
            await asyncio.sleep(self.interval)
