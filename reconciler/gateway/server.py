"""Serving the gateway with uvicorn, plus the one limit uvicorn lacks: a deadline for a
request's headers. Uvicorn's keep-alive timer only runs between requests, so a client that
opens a connection and sends its headers a byte at a time (slowloris) holds it forever.
Bodies have their own deadline in the app (`gateway.idle_timeout`, answered with 408)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol

HEADER_TIMEOUT = (
    10.0  # seconds from the first byte of a request (or the connection) to its last header
)


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing a connection whose request headers are not
    complete `seconds` after the connection opened or the previous response ended."""

    class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def _waiting_for_headers(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            transport = getattr(self, "transport", None)
            if transport is None or transport.is_closing() or transport.get_protocol() is not self:
                return  # closed, or upgraded to a WebSocket
            if self._waiting_for_headers():
                transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()  # headers complete: the body's deadline is the app's
            elif self._header_timer is None:
                self._arm()  # the next request on a kept-alive connection has begun

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline
