"""Serve one `CollectorRegistry` over HTTP (`/metrics`) in a daemon thread, and stop it again.

Each exporter passes its own registry: nothing is registered in prometheus_client's global
`REGISTRY`, so two exporters (or two tests) in one process never see each other's series."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from reconciler.config.schema import host_port


class MetricsServer:
    """`/metrics` for one registry on host:port; `close()` frees the port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self.host = host
        self._server: WSGIServer
        self._thread: threading.Thread
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); "
                "free the port or change it in the desired state's monitoring section"
            ) from exc
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{host_port(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
