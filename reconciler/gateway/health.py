"""Active health checks: probe every backend per its protocol on an interval and mark it
healthy or not in the routing table. Passive checks (failures during requests) live in the
router's circuit breaker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import httpx

from reconciler.backends.health import aprobe
from reconciler.gateway.router import Upstream

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        client: httpx.AsyncClient,
        interval: float,
        upstreams: Callable[[], Iterable[Upstream]],
        timeout: float = 2.0,
    ):
        self.client = client
        self.interval = interval
        self.timeout = min(timeout, interval * 2)
        self.upstreams = upstreams
        self.first_round = asyncio.Event()

    async def check(self, upstream: Upstream) -> None:
        health = await aprobe(self.client, upstream.base_url, upstream.protocol, self.timeout)
        if health.ok != upstream.healthy:
            log.info("backend %s is now %s %s", upstream.name, health.state.value, health.detail)
        upstream.healthy = health.ok
        upstream.health_detail = health.detail or health.state.value
        if health.ok and not upstream.circuit_open:
            upstream.consecutive_failures = 0

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams()), return_exceptions=True)

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # keep probing whatever one round did
                log.exception("health round failed")
            self.first_round.set()
            await asyncio.sleep(self.interval)
