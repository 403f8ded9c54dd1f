"""What the proxy tells about each request, for the operations plane (live telemetry,
reconciler/gateway/telemetry.py; NATS events, reconciler/gateway/events.py). Observers are
called in the request path: they must only record (queue, count), never block or wait."""

from __future__ import annotations

from typing import Any, Protocol

from reconciler.gateway.proxy_call import ProxyCall


class ProxyObserver(Protocol):
    def requested(self, call: ProxyCall) -> None:
        """The request reached the proxy (before a backend is chosen)."""

    def completed(
        self,
        call: ProxyCall,
        backend: str,
        status: str,
        seconds: float,
        usage: dict[str, Any] | None,
    ) -> None:
        """It was answered: `backend` ("none" if none was reached), HTTP `status` as counted in
        the metrics (499: the client left), `usage` the backend's token report if any."""
