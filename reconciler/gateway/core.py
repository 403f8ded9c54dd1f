"""Everything below the surfaces that one gateway instance owns: its desired state,
admission (keys, limits), request routing, the proxy and its transports, and what watches
the backends (health, load, GPU headroom). The surfaces (openai_api, ollama_api, websocket,
ops_api) are given this and depend on it; nothing here knows them. app.py assembles both."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable

import httpx

from reconciler.config.schema import DesiredState, GatewaySpec
from reconciler.drain import drain_dir
from reconciler.gateway.admission import Admission
from reconciler.gateway.auth import ApiKeys
from reconciler.gateway.backend_info import request_context
from reconciler.gateway.gpu_headroom import GpuHeadroom
from reconciler.gateway.health import HealthMonitor
from reconciler.gateway.limits import ConcurrencyLimiter
from reconciler.gateway.load import LoadScraper
from reconciler.gateway.metrics import GatewayMetrics
from reconciler.gateway.proxy import Proxy
from reconciler.gateway.routed import Routing
from reconciler.gateway.router import Router, RoutingTable, Upstream
from reconciler.gateway.secure_transport import SecureTransport
from reconciler.gateway.slots import SlotWatch
from reconciler.gateway.transport import LeanTransport
from reconciler.gpu.inventory import GpuInventory, NvmlInventory
from reconciler.monitoring.gpu_exporter import placement_from_state
from reconciler.paths import state_dir


def upstream_timeout(spec: GatewaySpec) -> httpx.Timeout:
    return httpx.Timeout(
        connect=spec.connect_timeout,
        read=spec.idle_timeout,
        write=spec.idle_timeout,
        pool=spec.connect_timeout,
    )


def make_transports(spec: GatewaySpec) -> dict[str, httpx.AsyncBaseTransport]:
    """Per URL scheme. Plain http (local and LAN backends) gets the lean transport; https gets
    httpx-aiohttp's, which stays fast with many connections (httpx's own pool was measured
    to degrade at concurrency 64). TF_GATEWAY_TRANSPORT=aiohttp uses it for http too. Both
    are held to the same answer limits by the proxy (reconciler/gateway/answer_limits.py).
    A private CA for https backends: SSL_CERT_FILE (read by this and by the probes' client)."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256, keepalive_expiry=15)
    secure = SecureTransport(limits=limits)
    if os.environ.get("TF_GATEWAY_TRANSPORT") == "aiohttp":
        return {"http": secure, "https": secure}
    return {"http": LeanTransport(spec.connect_timeout), "https": secure}


def context_limits(state: DesiredState) -> dict[str, int]:
    """Per model, the most tokens one request can have (backend_info.request_context: each
    kind's own rule), the largest among the model's backends. A backend running elsewhere
    (`url`) without a declared context_size makes the model's limit unknown (the backend judges)."""
    limits: dict[str, int] = {}
    unknown: set[str] = set()
    for backend in state.backends.values():
        per_request = request_context(backend)
        if per_request is None:
            unknown.add(backend.model)
            continue
        limits[backend.model] = max(limits.get(backend.model, 0), per_request)
    return {model: limit for model, limit in limits.items() if model not in unknown}


class GatewayCore:
    def __init__(
        self,
        state: DesiredState,
        transports: dict[str, httpx.AsyncBaseTransport] | None = None,
        gpus: GpuInventory | None = None,
    ):
        self.state = state
        self.spec = state.gateway
        self.context_limits = context_limits(state)
        self.affinity_header = self.spec.routing.affinity_header.lower().encode()
        self.metrics = GatewayMetrics()
        self.keys = ApiKeys(self.spec.api_keys_file)
        self.admission = Admission(
            self.keys, ConcurrencyLimiter(self.spec.max_concurrency_per_key), self.metrics
        )
        self.router = Router(
            RoutingTable.from_state(state),
            self.spec.routing.strategy,
            self.spec.routing.load_threshold,
        )
        self.transports = transports or make_transports(self.spec)
        # Probes get a plain httpx client of their own: exact error types ("connection
        # refused"), and no competition with requests for the proxy's connections.
        self.probe_client = httpx.AsyncClient(timeout=upstream_timeout(self.spec))
        self.routing = Routing(self.router, self.probe_client, self.metrics)
        self.slot_watch = SlotWatch(self.probe_client)  # slots left busy by cancelled requests
        self.proxy = Proxy(
            self.transports, upstream_timeout(self.spec), self.router, self.metrics, self.spec.first_byte_timeout,
            self.slot_watch,
        )  # fmt: skip
        self.health = HealthMonitor(
            self.probe_client, self.spec.health_interval, self.upstreams,
            drain_dir=drain_dir(state_dir(state.state_dir)),  # see reconciler/drain.py
        )  # fmt: skip
        self.load = LoadScraper(self.probe_client, self.spec.health_interval, self.upstreams)
        self.status_file = state_dir(state.state_dir) / "status.json"
        self.gpu_headroom = GpuHeadroom(
            gpus if gpus is not None else NvmlInventory(),
            self.local_placement,
            self.spec.health_interval,
            self.upstreams,
        )
        self.started = time.time()

    @property
    def table(self) -> RoutingTable:
        return self.router.table

    def upstreams(self) -> Iterable[Upstream]:
        return self.router.table.upstreams.values()

    def local_placement(self) -> dict[int, list[str]]:
        """GPU index -> backends this host runs on it (the reconciler's status file, pinned
        `gpu_ids`); a backend declared by URL runs elsewhere, on GPUs this host cannot see."""
        local = {name for name, b in self.state.backends.items() if b.managed}
        placed = placement_from_state(self.state, self.status_file)()
        return {index: [n for n in names if n in local] for index, names in placed.items()}

    def apply_state(self, state: DesiredState) -> None:
        """Swap in the routes of a new desired state; streams already open keep going."""
        self.router.table = RoutingTable.from_state(state, previous=self.router.table)
        self.router.strategy = state.gateway.routing.strategy
        self.router.load_threshold = state.gateway.routing.load_threshold
        self.context_limits = context_limits(state)
        self.state = state
        self.spec = state.gateway
        asyncio.get_running_loop().create_task(self.health.check_all())

    async def close(self) -> None:
        await self.slot_watch.close()
        await self.probe_client.aclose()
        for transport in set(self.transports.values()):
            await transport.aclose()
