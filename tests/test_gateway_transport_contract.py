"""One transport contract: what a backend's answer may make the gateway hold is enforced
above the transport (reconciler/gateway/answer_limits.py), so http backends (the lean
transport) and https backends (httpx-aiohttp's transport) are held to it alike. The https
backend here has a self-signed certificate made for the test with the `openssl` CLI, which
this test's gateway trusts through SSL_CERT_FILE (as an operator would trust a private CA)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import fleet_state, serve

from reconciler.gateway import answer_limits
from reconciler.gateway.app import create_app

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER_LIMIT = 256 * 1024  # lowered from 64 MiB for the test; the answers go just past it


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict) -> None:
    """Health checks (GET) get 200; a POST gets the answer `state["mode"]` names."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            if length:
                await reader.readexactly(length)
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
                continue
            mode = state["mode"]
            if mode in ("sized", "chunked"):  # just over the limit: declared, or only counted
                body = b'{"x": "' + b"x" * (ANSWER_LIMIT + 10_000) + b'"}'
                if mode == "sized":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
                    for i in range(0, len(body), 16_384):
                        piece = body[i : i + 16_384]
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
            elif mode == "ok":
                body = b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await writer.drain()
            elif mode == "headers":  # many headers, each short enough on its own
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(100_000):
                    writer.write(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000))
                    await writer.drain()
                    state["sent"] += 4000
            elif mode == "flood":  # a stream far faster than its reader, ended by the close
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                )
                event = b'data: "' + b"x" * 65_000 + b'"\n\n'
                for _ in range(1000):  # 65 MB if nothing slows it down
                    writer.write(event)
                    await writer.drain()
                    state["sent"] += len(event)
                return
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture(params=["http", "https"])
def backend(request, certificate, monkeypatch):
    """A raw asyncio backend on a loop of its own, plain or TLS; yields (url, state)."""
    scheme = request.param
    cert, key = certificate
    server_tls = None
    if scheme == "https":
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(cert, key)
    state = {"mode": "ok", "sent": 0}
    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def main():
        server = await asyncio.start_server(
            lambda r, w: _backend(r, w, state), "127.0.0.1", port, ssl=server_tls
        )
        ready.set()
        async with server:
            await server.serve_forever()

    def run():
        asyncio.set_event_loop(loop)
        holder["task"] = loop.create_task(main())
        try:
            loop.run_until_complete(holder["task"])
        except asyncio.CancelledError:
            pass
        # Connection handlers still open are ended here: left pending, they were destroyed
        # whenever the collector ran, logging in the middle of a later test.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the gateway makes its clients
    yield f"{scheme}://127.0.0.1:{port}", state
    loop.call_soon_threadsafe(holder["task"].cancel)
    thread.join(5)


@pytest.mark.parametrize("mode", ["sized", "chunked"])
def test_an_answer_over_the_limit_is_refused_alike_over_http_and_https(backend, mode, monkeypatch):
    """A whole answer past the limit is a 502 naming the limit, whichever transport carried
    it (before, the aiohttp path let a 70 MiB answer through unbounded), and the backend's
    slot is given back; an answer within the limit passes on the same gateway."""
    url, state = backend
    monkeypatch.setattr(answer_limits, "MAX_ANSWER_BYTES", ANSWER_LIMIT)
    port = free_port()
    app = create_app(fleet_state({"b1": url}))
    with serve(app, port):
        state["mode"] = "ok"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 200, r.text  # the https backend is trusted and reached
        state["mode"] = mode
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 502, r.text[:300]
        assert f"larger than {ANSWER_LIMIT} bytes" in r.json()["error"]["message"]
        assert app.table.upstreams["b1"].in_flight == 0


def test_an_endless_response_head_is_a_502_over_http_and_https(backend):
    """A head the transport refuses (the lean one past 64 KiB, aiohttp past its header count)
    is the backend's failure on both: a 502 naming the headers, never the gateway's own 500
    (aiohttp's refusal escaped httpx-aiohttp unmapped: secure_transport.py), and the backend's
    slot is given back. Over http the connection is cut at once; over TLS asyncio's graceful
    close goes on reading (and dropping) what the backend sends until it stops or
    ssl_shutdown_timeout passes, so the bytes sent are bounded only on http."""
    url, state = backend
    port = free_port()
    app = create_app(fleet_state({"b1": url}))
    with serve(app, port):
        state["mode"] = "headers"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 502, r.text[:300]
        assert "header" in r.json()["error"]["message"]
        if url.startswith("http:"):
            assert state["sent"] < 16 * 2**20
        assert app.table.upstreams["b1"].in_flight == 0


def test_a_stalled_client_slows_the_backend_over_http_and_https(backend):
    """Backpressure holds on both transports: while the client does not read, the gateway
    stops reading the backend, so TCP holds the backend back instead of 65 MB piling up in
    the gateway; once the client reads again, the whole answer flows."""
    url, state = backend
    state["mode"] = "flood"
    port = free_port()
    app = create_app(fleet_state({"b1": url}))
    with serve(app, port):
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                          json={**CHAT, "stream": True}, timeout=30) as response:  # fmt: skip
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = len(next(chunks))
            time.sleep(2)  # the client stalls; sockets and buffers fill up
            stalled_at = state["sent"]
            received += sum(len(c) for c in chunks)
    assert stalled_at < 24 * 2**20, (
        f"backend wrote {stalled_at / 2**20:.0f} MiB to a stalled client"
    )
    assert received > 60 * 2**20
