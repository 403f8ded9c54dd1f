"""The gateway's Prometheus metrics, on a registry of its own (no process-global state).

The names and labels are a contract with the dashboards; change them only together."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from reconciler.gateway.errors import GatewayError
from reconciler.gateway.router import Upstream

_CREATED = re.compile(rb"^(# (HELP|TYPE) )?tensorforge_gateway_\w+_created\b")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tensorforge_gateway_requests_total", "Requests answered, by HTTP status "
            "(499: client went away; a stream failing after its first byte counts as 502).",
            ["model", "backend", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "tensorforge_gateway_request_duration_seconds", "Request duration, to the last byte.",
            ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "tensorforge_gateway_time_to_first_token_seconds",
            "Time to the backend's first byte (first chunk when streaming).",
            ["model", "backend"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "tensorforge_gateway_tokens_total", "Tokens from the backends' usage reports.",
            ["model", "backend", "type"], registry=r,
        )  # fmt: skip
        # Per API-key client (the keys file's names): who uses how much. Only with keys on;
        # as many series as there are named clients, never one per request.
        self.client_requests = Counter(
            "tensorforge_gateway_client_requests_total", "Requests answered, by API-key client and status.",
            ["client", "model", "status"], registry=r,
        )  # fmt: skip
        self.client_tokens = Counter(
            "tensorforge_gateway_client_tokens_total", "Tokens from the backends' usage reports, by API-key client.",
            ["client", "model", "type"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "tensorforge_gateway_in_flight_requests",
            "Requests open at a backend.",
            ["backend"],
            registry=r,
        )
        self.retries = Counter(
            "tensorforge_gateway_retries_total",
            "Attempts that failed before the first byte and were retried elsewhere, by the failed backend.",
            ["model", "backend"], registry=r,
        )  # fmt: skip
        self.circuit_open = Gauge(
            "tensorforge_gateway_circuit_open",
            "1 while a backend's circuit is open.",
            ["backend"],
            registry=r,
        )
        self.backend_healthy = Gauge(
            "tensorforge_gateway_backend_healthy", "1 while a backend passes its health check.",
            ["backend", "model"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "tensorforge_gateway_rejected_total", "Requests refused before reaching a backend.",
            ["reason"], registry=r,
        )  # fmt: skip
        self._known: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}

    def refused(
        self, status: int, message: str, code: str, retry_after: str | None = None
    ) -> GatewayError:
        """The error to raise for a request the gateway refuses itself, counted by its code."""
        self.rejected.labels(code).inc()
        return GatewayError(status, message, code, retry_after=retry_after)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: the lookup showed up in the request path's profile."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count(self, model: str, backend: str, status: str, client: str | None = None) -> None:
        self.child(self.requests, model, backend, status).inc()
        if client is not None:
            self.child(self.client_requests, client, model, status).inc()

    def record_tokens(
        self, model: str, backend: str, usage: dict[str, Any], client: str | None = None
    ) -> None:
        for kind in ("prompt", "completion"):
            count = usage.get(f"{kind}_tokens")
            if isinstance(count, int) and count > 0:
                self.child(self.tokens, model, backend, kind).inc(count)
                if client is not None:
                    self.child(self.client_tokens, client, model, kind).inc(count)

    def render(self, upstreams: Iterable[Upstream]) -> bytes:
        """Refresh the per-backend gauges from the live routing state, then serialize."""
        current = set()
        for u in upstreams:
            current.add(u.name)
            self.in_flight.labels(u.name).set(u.in_flight)
            self.circuit_open.labels(u.name).set(1 if u.circuit_open else 0)
            self.backend_healthy.labels(u.name, u.model).set(1 if u.healthy else 0)
        for gone in self._known - current:  # removed by a reload: stop reporting them
            for gauge in (self.in_flight, self.circuit_open):
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        self._known = current
        # Only the contracted series: drop the client library's `*_created` companions
        # (switching them off is process-global in prometheus_client).
        lines = generate_latest(self.registry).split(b"\n")
        return b"\n".join(line for line in lines if not _CREATED.search(line))
