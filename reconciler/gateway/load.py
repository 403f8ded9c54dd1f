"""Backend-reported load: scrape each backend's Prometheus endpoint on an interval (llama.cpp
`llamacpp:requests_processing`, vLLM `vllm:num_requests_running/waiting`, TGI `tgi_queue_size`),
and ask backends that load models on demand (Ollama's `/api/ps`) whether the model is in
memory; keep the answers on the routing table for least-load scoring."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import httpx

from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.router import Upstream

log = logging.getLogger(__name__)
MISSING_RETRY_SECONDS = 30.0  # a backend without /metrics is asked again only this often


class LoadScraper:
    def __init__(
        self,
        client: httpx.AsyncClient,
        interval: float,
        upstreams: Callable[[], Iterable[Upstream]],
    ):
        self.client = client
        self.interval = interval
        self.upstreams = upstreams
        self.timeout = min(2.0, interval)
        self._skip_until: dict[str, float] = {}

    async def describe(self, upstream: Upstream) -> None:
        """Once per backend: its own concurrency limit (TGI's /info max_concurrent_requests),
        so the gateway answers 429 itself instead of passing on the backend's overload."""
        adapter = adapter_for(upstream.protocol)
        if adapter.info_path is None or upstream.backend_limit is not None or not upstream.healthy:
            return
        try:
            response = await self.client.get(
                upstream.base_url + adapter.info_path,
                timeout=self.timeout,
                headers=upstream.headers,
            )
            if response.status_code == 200:
                upstream.backend_limit = adapter.parse_info(response.json())
        except (httpx.HTTPError, ValueError):
            pass

    async def check_warm(self, upstream: Upstream) -> None:
        adapter = adapter_for(upstream.protocol)
        if adapter.loaded_path is None:
            return
        try:
            response = await self.client.get(
                upstream.base_url + adapter.loaded_path,
                timeout=self.timeout,
                headers=upstream.headers,
            )
            document = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            document = None
        upstream.warm = (
            None if document is None else adapter.holds_model(document, upstream.served_name)
        )

    async def scrape(self, upstream: Upstream) -> None:
        await self.describe(upstream)
        await self.check_warm(upstream)
        adapter = adapter_for(upstream.protocol)
        loop = asyncio.get_running_loop()
        if adapter.metrics_path is None or self._skip_until.get(upstream.name, 0) > loop.time():
            return
        try:
            response = await self.client.get(
                upstream.base_url + adapter.metrics_path,
                timeout=self.timeout,
                headers=upstream.headers,
            )
        except httpx.HTTPError:
            upstream.reported_load, upstream.kv_usage = 0.0, None
            return
        if response.status_code != 200:
            # llama-server without --metrics answers 501; do not ask every round.
            self._skip_until[upstream.name] = loop.time() + MISSING_RETRY_SECONDS
            upstream.reported_load, upstream.kv_usage = 0.0, None
            return
        load = adapter.parse_load(response.text)
        # Our own in-flight requests are counted separately; count only what the backend
        # holds beyond them (other clients, or work we already gave up on).
        upstream.reported_load = max(0.0, load.requests - upstream.in_flight)
        upstream.kv_usage = load.kv_usage

    async def scrape_all(self) -> None:
        now = time.monotonic()  # a backend settling a cancelled request is left alone (slots.py)
        await asyncio.gather(*(self.scrape(u) for u in self.upstreams() if u.quiet_until <= now),
                             return_exceptions=True)  # fmt: skip

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scrape_all()
            except Exception:  # keep scraping whatever one round did
                log.exception("load scrape round failed")
