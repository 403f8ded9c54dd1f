"""A lean HTTP/1.1 transport for httpx: persistent connections to the backends, parsed by
httptools, no per-request machinery beyond that. It keeps httpx's Request and Response API
for the proxy; the profile showed httpx's client layer and aiohttp's request path as the
largest share of the gateway's own CPU per request.

Backends are plain HTTP on a trusted network (or localhost); for https:// URLs the gateway
uses httpx-aiohttp's transport instead (see `core.make_transports`). What an answer may make
the gateway hold is enforced above both, in answer_limits.py; this transport's own limits
are those only it can see (the response head) and its read buffer (READ_HIGH_WATER)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

IDLE_EXPIRY = 15.0  # seconds an unused connection stays in the pool
MAX_IDLE_PER_HOST = 256
MAX_HEADER_BYTES = 64 * 1024  # status line and headers of one answer, as h11's default
READ_HIGH_WATER = 1024 * 1024  # unread bytes of one answer before the backend is paused


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers one request at a time."""

    def __init__(self, pool: LeanTransport, key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.head_request = False  # a HEAD's answer has no body, whatever its headers say
        self.paused = False  # reading paused until the consumer catches up (on_body)
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0  # the status line and headers httptools handed over so far
        self.head_received = 0  # bytes received while the head was not yet whole
        self.headers_done = False
        self.head: asyncio.Future[int] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes in `chunks`, not yet taken by the reader
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.until_eof = False  # the body ends when the backend closes (RFC 9112 §6.3)
        self.error: Exception | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return  # failed (and closing): what else comes is not parsed
        headers_done = self.headers_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response from backend: {exc}"))
            self.close()
            return
        if not headers_done and not self.headers_done:  # all of `data` was head, some of it
            self.head_received += len(data)  # held by httptools in a header not yet ended
            if self.head_received > MAX_HEADER_BYTES:
                self._head_too_large()

    def _head_too_large(self) -> None:
        self._fail(
            httpx.RemoteProtocolError(f"backend response headers exceed {MAX_HEADER_BYTES} bytes")
        )
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_eof and not self.complete and self.error is None:
            self.complete = True  # httptools has no call for "EOF": the close ends the body
            self.keep_alive = False
            self._wake()
        elif not self.complete:
            if self.head is not None and not self.head.done():
                self._fail(
                    httpx.RemoteProtocolError("backend closed the connection without answering")
                )
            else:
                self._fail(httpx.ReadError("backend closed the connection mid-response"))

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers_done = False  # after a 1xx, another head follows: count it too

    def on_status(self, status: bytes) -> None:
        self.header_bytes += len(status) + 15  # "HTTP/1.1 200 " and the CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4  # ": " and the CRLF
        if self.header_bytes > MAX_HEADER_BYTES:  # a head cut into few reads: count it here
            self._head_too_large()
            raise httpx.RemoteProtocolError("headers too large")  # stops httptools mid-chunk
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful until the body ends
        if not self.keep_alive:  # kept-alive answers are length-delimited: skip the header scan
            self.until_eof = self._body_until_eof()
        if self.head is not None and not self.head.done():
            self.head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.paused and self.transport is not None:
            # The client reads slower than the backend writes: stop reading, so TCP slows the
            # backend down instead of the answer piling up in the gateway's memory.
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def take(self) -> bytes:
        """Everything buffered, and reading resumed if it was paused."""
        data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self.paused = False
        return data

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- helpers ---------------------------------------------------------------------------
    def _body_until_eof(self) -> bool:
        """No Content-Length and not chunked (HTTP/1.0, `Connection: close`): per RFC 9112
        §6.3 the body is whatever comes until the backend closes the connection."""
        status = self.parser.get_status_code()
        if self.head_request or status < 200 or status in (204, 304):
            return False
        for name, value in self.headers:
            name = name.lower()
            if name == b"content-length" or (
                name == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:  # the first failure is the cause: the close that follows is not
            self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def release(self) -> None:
        """Back to the pool when the answer was read whole and the backend keeps it open."""
        if self.complete and self.keep_alive and not self.closed and self.error is None:
            if self.paused and self.transport is not None:
                self.transport.resume_reading()  # the next answer on this connection must flow
                self.paused = False
            self._reset()
            self.parser = httptools.HttpResponseParser(self)
            self.pool._put(self)
        else:
            self.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, connection: _Connection, read_timeout: float | None):
        self.connection = connection
        self.read_timeout = read_timeout
        self.done = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        c = self.connection
        loop = asyncio.get_running_loop()
        while True:
            if c.chunks:
                yield c.take()
                continue
            if c.complete:
                self.done = True
                return
            if c.error is not None:
                raise c.error
            c.waiter = loop.create_future()
            timer = (
                loop.call_later(self.read_timeout, _expire, c.waiter) if self.read_timeout else None
            )
            try:
                await c.waiter
            finally:
                c.waiter = None
                if timer is not None:
                    timer.cancel()

    async def aclose(self) -> None:
        if self.closed:  # httpx closes after reading, and the proxy closes again
            return
        self.closed = True
        if self.done or self.connection.complete:  # read whole, or ended while unread: reusable
            self.connection.release()
        else:
            self.connection.close()  # abandoned mid-answer: closing tells the backend to stop


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(httpx.ReadTimeout("backend sent nothing within the idle timeout"))


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    def _put(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) < MAX_IDLE_PER_HOST:
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            connection.close()

    async def _get(
        self, key: tuple[str, int], timeouts: dict[str, Any]
    ) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_EXPIRY:
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        timeout = timeouts.get("connect") or self.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, key), key[0], key[1]
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(
                f"no connection to {key[0]}:{key[1]} within {timeout:g}s"
            ) from exc
        except OSError as exc:
            raise httpx.ConnectError(
                f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}"
            ) from exc
        return connection, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol("the lean transport speaks plain http only")
        key = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout", {})
        connection, reused = await self._get(key, timeouts)
        head = b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path)
        lines = [
            head,
            *(b"%s: %s\r\n" % (k, v) for k, v in request.headers.raw),
            b"\r\n",
            request.content,
        ]
        connection.head = asyncio.get_running_loop().create_future()
        connection.head_request = request.method == "HEAD"
        assert connection.transport is not None
        connection.transport.write(b"".join(lines))
        read_timeout = timeouts.get("read")
        # A non-streaming answer's headers come when it is all done: wait as long as for a
        # first byte (the caller's "first_byte" entry), not just the idle timeout.
        head_timeout = timeouts.get("first_byte", read_timeout)
        try:
            if head_timeout:
                async with asyncio.timeout(head_timeout):
                    status = await connection.head
            else:
                status = await connection.head
        except TimeoutError as exc:
            connection.close()
            raise httpx.ReadTimeout(
                f"backend sent no response headers within {head_timeout:g}s"
            ) from exc
        except BaseException:
            connection.close()
            raise
        return httpx.Response(
            status, headers=connection.headers, stream=_Body(connection, read_timeout),
            request=request, extensions={"http_version": b"HTTP/1.1", "reused": reused},
        )  # fmt: skip

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
