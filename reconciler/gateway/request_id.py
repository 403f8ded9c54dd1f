"""Request ids and trace context: the client's `x-request-id` (or a new one) and its W3C
`traceparent` go to the backend with the request and come back on the response, so one id
follows a request through client, gateway logs and backend."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Awaitable

from reconciler.gateway.asgi import ASGIApp, Message, Receive, Scope, Send

# Printable ASCII, bounded: the id goes into logs and the backend's headers as it is.
_VALID = re.compile(rb"[\x21-\x7e]{1,128}")
TRACED = (b"x-request-id", b"traceparent", b"tracestate")


class _Ids:
    """Unique ids of 32 hex digits, as uuid4().hex looks, for a fraction of its cost (it was
    a few percent of the gateway's CPU per request): a random prefix per process, then a
    counter. Unique, not secret: nothing may rely on an id being unguessable."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


# Process-wide like the OS's random source it replaces; a forked child gets a prefix of its own.
new_id = _Ids()
os.register_at_fork(after_in_child=new_id.reseed)


def with_request_id(app: ASGIApp) -> ASGIApp:
    """`app` wrapped so every HTTP request has an `x-request-id` header (the client's, if it
    sent a sane one) and every response carries it back, with the client's traceparent."""

    async def entry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = scope["headers"]
        echo = [(k, v) for k, v in headers if k in TRACED and _VALID.fullmatch(v)]
        if not any(k == b"x-request-id" for k, _ in echo):
            new = (b"x-request-id", new_id().encode())
            echo.append(new)
            scope = {**scope, "headers": [*(h for h in headers if h[0] != b"x-request-id"), new]}

        def send_with_id(message: Message) -> Awaitable[None]:
            # Not a coroutine of its own: the server's send is awaited directly, which saves
            # a frame on every chunk of a stream.
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in echo if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            return send(message)

        await app(scope, receive, send_with_id)

    return entry


def trace_headers(headers: dict[bytes, bytes]) -> tuple[tuple[str, str], ...]:
    """What of the request's trace context to send the backend."""
    return tuple(
        (k.decode(), v.decode())
        for k in TRACED
        if (v := headers.get(k)) is not None and _VALID.fullmatch(v)
    )
