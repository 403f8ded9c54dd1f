"""Limits on what a backend can make the gateway hold: response heads (transport), whole
non-streamed answers (answer_limits, above the transport), and unterminated SSE events /
NDJSON lines (sse)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import fleet_state, serve

from reconciler.gateway import answer_limits, sse
from reconciler.gateway.answer_limits import read_whole
from reconciler.gateway.app import create_app
from reconciler.gateway.sse import EventParser, LineParser
from reconciler.gateway.transport import LeanTransport

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SENT = {"bytes": 0}  # what the "flood" backend managed to write


async def _evil(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str) -> None:
    """Answers health checks (GET) properly; every POST gets `mode`'s endless answer."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
                continue
            if mode == "headers":  # many headers, each short enough on its own
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(100_000):
                    writer.write(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000))
                    await writer.drain()
            elif mode == "one-header":  # a single header value that never ends
                writer.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                for _ in range(100_000):
                    writer.write(b"a" * 4000)
                    await writer.drain()
            elif mode == "flood":  # a stream far faster than its reader, ended by the close
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                )
                event = b'data: "' + b"x" * 65_000 + b'"\n\n'
                for _ in range(1000):  # 65 MB if nothing slows it down
                    writer.write(event)
                    await writer.drain()
                    SENT["bytes"] += len(event)
                return
            elif mode == "body":  # a length-delimited answer just over the (lowered) cap
                body = b"x" * 300_000
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.fixture
def evil_backend():
    """A raw asyncio backend on 127.0.0.1, on a loop of its own; yields (url, set_mode)."""
    mode = {"m": "headers"}
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main():
        server = await asyncio.start_server(lambda r, w: _evil(r, w, mode["m"]), "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    task_holder = {}

    def run():
        asyncio.set_event_loop(loop)
        task_holder["t"] = loop.create_task(main())
        try:
            loop.run_until_complete(task_holder["t"])
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield f"http://127.0.0.1:{port}", lambda m: mode.__setitem__("m", m)
    loop.call_soon_threadsafe(task_holder["t"].cancel)
    thread.join(5)


@pytest.mark.parametrize("mode", ["headers", "one-header"])
def test_endless_response_headers_fail_fast_with_502(evil_backend, mode):
    """httptools sets no limit on a response head: without the transport's 64 KiB cap, a
    backend streaming headers (many, or one endless value) grows the gateway's memory by GBs.
    The cap must turn it into a quick 502 and release the upstream's in-flight slot."""
    url, set_mode = evil_backend
    set_mode(mode)
    port = free_port()
    app = create_app(fleet_state({"b1": url}))
    with serve(app, port):
        started = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
        elapsed = time.monotonic() - started
        assert r.status_code == 502, r.text
        assert "header" in r.text
        assert elapsed < 5
        deadline = time.monotonic() + 5
        while app.table.upstreams["b1"].in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.table.upstreams["b1"].in_flight == 0


def test_whole_answer_over_the_body_cap_fails(evil_backend, monkeypatch):
    """A non-streamed answer is held whole in memory: past MAX_ANSWER_BYTES the proxy's
    `read_whole` fails with RemoteProtocolError (the proxy's 502) instead of buffering on, while
    streamed reads of the same answer are not capped (the relay holds one chunk at a time).
    The same limit over https: tests/test_gateway_transport_contract.py."""
    url, set_mode = evil_backend
    set_mode("body")
    monkeypatch.setattr(answer_limits, "MAX_ANSWER_BYTES", 256 * 1024)

    async def main():
        async with httpx.AsyncClient(transport=LeanTransport(), timeout=10) as client:
            async with client.stream("POST", url + "/v1/chat/completions", json=CHAT) as r:
                with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
                    await read_whole(r)
            async with client.stream("POST", url + "/v1/chat/completions", json=CHAT) as r:
                assert sum([len(c) async for c in r.aiter_raw()]) == 300_000

    asyncio.run(main())


def test_unterminated_event_is_refused_after_a_mebibyte():
    """A backend that never ends an event must not make the parser buffer (and, before the
    tail logic, re-copy per feed: quadratic) all of it: 40 MiB offered in 64 KiB chunks, the
    parser gives up with ValueError before having taken 2 MiB, and quickly."""
    parser = EventParser()
    piece = b"data: " + b"x" * (64 * 1024 - 6)
    fed = 0
    started = time.monotonic()
    with pytest.raises(ValueError, match="longer than"):
        while fed < 40 * 1024 * 1024:
            parser.feed(piece)
            fed += len(piece)
    assert sse.MAX_EVENT_BYTES <= fed + len(piece) <= 2 * 1024 * 1024
    assert time.monotonic() - started < 1.0


def test_unterminated_line_is_refused_after_a_mebibyte():
    """The NDJSON parser has the same limit for a line that never ends."""
    parser = LineParser()
    fed = 0
    with pytest.raises(ValueError, match="longer than"):
        while fed < 40 * 1024 * 1024:
            parser.feed(b"x" * 65536)
            fed += 65536
    assert fed + 65536 <= 2 * 1024 * 1024


def test_byte_by_byte_feed_parses_as_one_feed():
    """Only the new bytes (plus the boundary) are searched for terminators: a stream cut at
    every byte, with CRLF and LF separators, `\\r\\n\\r\\n` cut anywhere, and UTF-8 characters
    split across feeds, must parse exactly as the same stream fed whole (and flush the same)."""
    stream = (
        b'data: {"a":"h\xc3\xa9"}\r\n\r\n'
        b": comment\n"
        b'data: {"b":1}\n\n'
        b"event: x\r\ndata: line1\r\ndata: line2\r\n\r\n"
        b"data: \xe2\x82\xac\n\n"
        b"data: [DONE]\r\n\r\n"
        b"data: tail-without-blank-line"
    )
    whole = EventParser()
    expected = whole.feed(stream) + whole.flush()
    assert expected == [
        '{"a":"hé"}',
        '{"b":1}',
        "line1\nline2",
        "€",
        "[DONE]",
        "tail-without-blank-line",
    ]
    split = EventParser()
    got = [
        data for i in range(len(stream)) for data in split.feed(stream[i : i + 1])
    ] + split.flush()
    assert got == expected

    lines = b'{"a":"\xc3\xa9"}\n\n{"b":2}\r\n{"c":3}'
    whole_lines = LineParser()
    expected_lines = whole_lines.feed(lines) + whole_lines.flush()
    assert expected_lines == [{"a": "é"}, {"b": 2}, {"c": 3}]
    split_lines = LineParser()
    got_lines = [
        d for i in range(len(lines)) for d in split_lines.feed(lines[i : i + 1])
    ] + split_lines.flush()
    assert got_lines == expected_lines


def test_a_stalled_client_slows_the_backend_instead_of_filling_the_gateway(evil_backend):
    """Backpressure: while the client does not read, the transport stops reading the backend
    (READ_HIGH_WATER), so TCP holds the backend back. Without it the gateway took all 65 MB
    of the answer into memory at once."""
    url, set_mode = evil_backend
    set_mode("flood")
    SENT["bytes"] = 0
    port = free_port()
    app = create_app(fleet_state({"b1": url}))
    with serve(app, port):
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                          json={**CHAT, "stream": True}, timeout=30) as response:  # fmt: skip
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = len(next(chunks))
            time.sleep(2)  # the client stalls; sockets and the high-water mark fill up
            stalled_at = SENT["bytes"]
            received += sum(len(c) for c in chunks)  # then reads everything
    assert stalled_at < 24 * 2**20, (
        f"backend wrote {stalled_at / 2**20:.0f} MiB to a stalled client"
    )
    assert received > 60 * 2**20  # and once it reads again, the whole answer flows
