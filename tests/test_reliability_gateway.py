"""Issue 14, the gateway's side: no single request wedges a backend for everyone, timeouts and
drops under load open no circuit (unavailability does), overload is answered 429 with
Retry-After before the backend sees more than its slots, and WebSocket connections and
queues have gateway-wide ceilings.

The llama.cpp cases run against the real server (xllamacpp, SmolLM2). The rest use
`FakeLlama`, a raw-socket llama.cpp stand-in whose faults can be chosen: a request that
never answers, a connection dropped before any byte, a slot left busy (its /slots and
/slots/{id}?action=erase shapes are llama.cpp's, as measured on the real server)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from conftest import free_port, smollm2_config
from fakes.upstreams import CHAT_ANSWER, serve

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class FakeLlama:
    """llama-server's HTTP surface on a raw socket. `mode` for completions: "ok" (answer
    after `delay`), "hang" (never answer), "drop" (close before any byte), "drop-when-busy"
    (drop while another request is open, else ok). `stuck_slots`: ids /slots reports busy
    whatever happens (a wedged generation); `erase_supported` decides /slots/{id}?action=erase."""

    def __init__(self, mode: str = "ok", delay: float = 0.0):
        self.mode, self.delay = mode, delay
        self.stuck_slots: list[int] = []
        self.erase_supported = False
        self.erased: list[int] = []
        self.open = 0
        self.most_open = 0
        self.completions = 0
        self.hung_closed = 0  # hung requests whose connection the gateway closed

    @contextmanager
    def serve(self, port: int) -> Iterator[None]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        server: list[asyncio.Server] = []

        async def main() -> None:
            server.append(await asyncio.start_server(self._connection, "127.0.0.1", port))
            started.set()

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(main(), loop)
        assert started.wait(5)
        try:
            yield
        finally:

            async def stop() -> None:
                server[0].close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode().split("\r\n")
                method, target, _ = line.split(" ")
                length = next(
                    (
                        int(h.split(":")[1])
                        for h in headers
                        if h.lower().startswith("content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                if not await self._answer(method, target, body, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, method, target, body, reader, writer) -> bool:
        if method == "GET" and target == "/health":
            return await _send(writer, 200, {"status": "ok"})
        if method == "GET" and target == "/slots":
            busy = set(self.stuck_slots) | (
                {1} if self.open and 1 not in self.stuck_slots else set()
            )
            return await _send(
                writer, 200, [{"id": i, "is_processing": i in busy} for i in range(2)]
            )
        if method == "POST" and target.startswith("/slots/"):
            if not self.erase_supported:
                return await _send(writer, 501, {"error": {"code": 501, "type": "not_supported_error",
                                   "message": "This server does not support slots action. Start it with `--slot-save-path`"}})  # fmt: skip
            slot = int(target.split("/")[2].split("?")[0])
            self.erased.append(slot)
            self.stuck_slots = [s for s in self.stuck_slots if s != slot]
            return await _send(writer, 200, {"id_slot": slot, "n_erased": 0})
        if method == "GET":
            return await _send(writer, 404, {"error": "not found"})
        self.completions += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            mode = self.mode
            if mode == "drop-when-busy":
                mode = "drop" if self.open > 1 else "ok"
            if mode == "drop":
                return False
            if mode == "hang":
                await reader.read(1)  # returns when the gateway closes the connection
                self.hung_closed += 1
                return False
            await asyncio.sleep(self.delay)
            if json.loads(body or b"{}").get("stream"):
                return await _send_stream(writer)
            return await _send(writer, 200, CHAT_ANSWER)
        finally:
            self.open -= 1


async def _send(writer: asyncio.StreamWriter, status: int, obj: object) -> bool:
    data = json.dumps(obj).encode()
    writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (status, len(data), data))  # fmt: skip
    await writer.drain()
    return True


async def _send_stream(writer: asyncio.StreamWriter) -> bool:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "hi"}}],
    }
    data = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(data), data))  # fmt: skip
    await writer.drain()
    return True


def llama_state(url: str, parallel: int = 2, **gateway) -> DesiredState:
    return DesiredState.model_validate({
        "models": {"m": {"source": "pypi:x"}},
        "backends": {"llama": {"kind": "llamacpp", "model": "m", "url": url, "parallel": parallel}},
        "gateway": {"health_interval": 0.2, **gateway},
    })  # fmt: skip


def wait_until(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    pytest.fail(f"{what} within {timeout}s")


# -- the real llama.cpp ------------------------------------------------------------------------


def busy_slots(llama_url: str) -> list[int]:
    return [s["id"] for s in httpx.get(llama_url + "/slots").json() if s["is_processing"]]


def test_an_empty_prompt_with_n_2_is_refused_and_wedges_nobody(llama_server, run_gateway):
    """Issue 14, finding 1: this request never answered, held a slot, and three of them opened
    the circuit for every user. Now it is the client's 400, naming the field."""
    url = run_gateway(smollm2_config(llama_server, free_port()))
    wedging = {"model": "smollm2", "prompt": "", "n": 2, "max_tokens": 4}
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(url + "/v1/completions", json=wedging, timeout=60), range(3)
            )
        )
    for answer in answers:
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "n" and error["message"].startswith("n: llama.cpp cannot"), error
    assert busy_slots(llama_server) == []
    ok = httpx.post(url + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "n": 2, "max_tokens": 4},
                    timeout=60)  # fmt: skip
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    health = httpx.get(url + "/health").json()["backends"]["cpu"]
    assert health["healthy"] and not health["circuit_open"], health


def test_a_request_past_its_deadline_is_cancelled_at_the_backend(llama_server, run_gateway):
    """The backend's request_timeout ends a long generation: the client is told (an error
    event, or 504 when nothing came before it), and llama.cpp's slot comes free."""
    config = smollm2_config(llama_server, free_port())
    config["backends"]["cpu"]["request_timeout"] = 2.0
    url = run_gateway(config)
    long = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 800, "ignore_eos": True}  # fmt: skip
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**long, "stream": True}, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        status = r.status_code
    if status == 200:
        assert lines[-1] != "data: [DONE]", "the stream ran to its end: no deadline"
        assert "stream cancelled at the backend: its deadline passed" in lines[-1], lines[-1]
    else:
        assert status == 504
    # Looked at every 1.5 s: llama.cpp sees a closed connection only after a second without
    # task results, and each /slots query is one (reconciler/gateway/slots.py).
    wait_until(
        lambda: busy_slots(llama_server) == [], 30, "llama.cpp's slot never came free", every=1.5
    )
    whole = httpx.post(url + "/v1/chat/completions", json=long, timeout=60)
    assert whole.status_code == 504, whole.text
    assert "cancelled at the backend" in whole.json()["error"]["message"]
    wait_until(
        lambda: busy_slots(llama_server) == [], 30, "llama.cpp's slot never came free", every=1.5
    )

    def settled() -> dict | None:
        health = httpx.get(url + "/health").json()["backends"]["cpu"]
        return health if health["wedged"] is None else None

    health = wait_until(settled, 30, "the backend stayed out of routing", every=1.0)
    assert health["healthy"] and not health["circuit_open"], health


# -- circuits, overload and wedged slots, on FakeLlama -----------------------------------------


def test_timeouts_open_no_circuit_and_a_slot_left_busy_is_reported(monkeypatch):
    fake = FakeLlama(mode="hang")
    port, gateway_port = free_port(), free_port()
    app = create_app(llama_state(f"http://127.0.0.1:{port}", first_byte_timeout=0.5))
    with fake.serve(port), serve(app, gateway_port):
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(
            lambda: httpx.get(url + "/health").json()["backends_healthy"] == 1, 10, "never healthy"
        )
        for _ in range(4):
            answer = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
            assert answer.status_code == 504, answer.text
        assert not app.table.upstreams["llama"].circuit_open  # 4 timeouts: still the request's own
        wait_until(
            lambda: fake.hung_closed == 4, 10, "the gateway did not close the timed-out requests"
        )

        # The backend keeps a slot busy for nobody: erase unsupported, so it is reported wedged.
        # (The check after the last timeout may see it first: then this one is refused, 503.)
        fake.stuck_slots = [0]
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code in (
            503,
            504,
        )
        health = wait_until(lambda: (h := httpx.get(url + "/health").json()["backends"]["llama"])["wedged"] and h,
                            15, "the busy slot was never reported")  # fmt: skip
        assert (
            "slot(s) 0 stay busy with no request open" in health["wedged"]
            and "restart" in health["wedged"]
        )
        refused = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert refused.status_code == 503 and "wedged" in refused.json()["error"]["message"]

        # Restarted (no slot busy): routed to again.
        fake.stuck_slots, fake.mode = [], "ok"
        wait_until(lambda: httpx.get(url + "/health").json()["backends"]["llama"]["wedged"] is None, 15,
                   "never routed to again")  # fmt: skip
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_a_slot_left_busy_is_erased_where_llama_cpp_supports_it():
    fake = FakeLlama(mode="hang")
    fake.erase_supported = True
    port, gateway_port = free_port(), free_port()
    app = create_app(llama_state(f"http://127.0.0.1:{port}", first_byte_timeout=0.5))
    with fake.serve(port), serve(app, gateway_port):
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(
            lambda: httpx.get(url + "/health").json()["backends_healthy"] == 1, 10, "never healthy"
        )
        fake.stuck_slots = [1]
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 504
        wait_until(lambda: fake.erased == [1], 15, "the busy slot was never erased")
        time.sleep(2)  # what the watcher concludes after the erase
        assert app.table.upstreams["llama"].wedged is None
        fake.mode = "ok"
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_overload_is_answered_429_before_the_backend_sees_more_than_its_slots():
    """parallel 1: one running, one waiting for the slot at the backend, two queued in the
    gateway; the rest get 429 with Retry-After, and every admitted request is answered."""
    fake = FakeLlama(mode="ok", delay=0.5)
    port, gateway_port = free_port(), free_port()
    app = create_app(llama_state(f"http://127.0.0.1:{port}", parallel=1))
    with fake.serve(port), serve(app, gateway_port):
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(
            lambda: httpx.get(url + "/health").json()["backends_healthy"] == 1, 10, "never healthy"
        )
        with ThreadPoolExecutor(10) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60),
                    range(10),
                )
            )
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 4, statuses  # 2 at the backend + 2 queued, at least
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 429)
    assert fake.most_open <= 2, f"the backend saw {fake.most_open} requests at once"
    assert not app.table.upstreams["llama"].circuit_open


def test_drops_under_load_open_no_circuit_but_refusals_do():
    fake = FakeLlama(mode="drop-when-busy", delay=1.0)
    port, gateway_port = free_port(), free_port()
    # Probes far apart: a passing probe resets the failure count, and this test is about what
    # requests alone count.
    app = create_app(llama_state(f"http://127.0.0.1:{port}", parallel=1, health_interval=60))
    upstream = app.table.upstreams["llama"]
    backend = ExitStack()
    backend.enter_context(fake.serve(port))
    with backend, serve(app, gateway_port):
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(
            lambda: httpx.get(url + "/health").json()["backends_healthy"] == 1, 10, "never healthy"
        )
        for _ in range(3):  # one answered; the others dropped while the backend is busy
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30),
                                        range(4)))  # fmt: skip
            statuses = [a.status_code for a in answers]
            # Overload, not failure: 429 (before: 502 "all backends failed", then the circuit).
            assert 200 in statuses and set(statuses) <= {200, 429}, [a.text for a in answers]
            assert not upstream.circuit_open, "drops under load opened the circuit"
        assert fake.completions > 4  # some were dropped and tried again, or answered 429
        # A drop with nothing else open is the backend's failure ("reset before any byte").
        fake.mode = "drop"
        for _ in range(3):
            assert (
                httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 502
            )
        assert upstream.circuit_open
        backend.close()  # gone: connections refused
        upstream.record_success()
        # Refused (the backend is gone): the circuit opens after three.
        for _ in range(3):
            assert (
                httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 502
            )
        assert upstream.circuit_open


# -- WebSocket ceilings ------------------------------------------------------------------------


def collect(connection, ids: set[str]) -> dict:
    """Messages until each id in `ids` has ended; refusals of queued messages (id None)."""
    ends: dict[str, str] = {}
    refused: list[str] = []
    while set(ends) != ids:
        message = json.loads(connection.recv(timeout=30))
        if message["id"] is None:
            refused.append(message["error"]["message"])
        elif message["type"] in ("done", "error", "response"):
            ends[message["id"]] = message["type"]
    return {"ends": ends, "refused": refused}


def test_websocket_ceilings_count_every_connection():
    from reconciler.gateway.websocket import Ceilings

    ceilings = Ceilings(per_key=2, total=4, queued_bytes=10)
    assert [ceilings.enter(who) for who in ("a", "a", "b")] == [None, None, None]
    assert "this key already has 2" in (ceilings.enter("a") or "")
    assert ceilings.enter("c") is None
    assert "most WebSocket connections (4)" in (ceilings.enter("d") or "")
    ceilings.leave("b")
    assert ceilings.enter("d") is None
    assert ceilings.reserve(6) and not ceilings.reserve(5) and ceilings.reserve(4)


def test_websocket_connections_and_queued_bytes_have_ceilings(tmp_path):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    fake = FakeLlama(mode="ok", delay=1.0)
    port, gateway_port = free_port(), free_port()
    state = llama_state(f"http://127.0.0.1:{port}", max_websockets_per_key=2, max_websockets=3,
                        max_websocket_queued_bytes=3000, max_body_bytes=2000)  # fmt: skip
    with fake.serve(port), serve(create_app(state), gateway_port):
        ws_url = f"ws://127.0.0.1:{gateway_port}/v1/ws"
        held = [connect(ws_url), connect(ws_url)]
        with pytest.raises((InvalidStatus, ConnectionClosed)):  # a third from the same client
            extra = connect(ws_url)
            extra.recv(timeout=5)
        held[1].close()
        held[1] = connect(ws_url)  # a closed one frees its place

        # Queued bytes, over all connections: 2 x 1,300 fit under 3,000, the third does not
        # (each connection alone could queue 2 x max_body_bytes = 4,000).
        big = {"endpoint": "/v1/chat/completions",
               "body": {**CHAT, "messages": [{"role": "user", "content": "y" * 1200}]}}  # fmt: skip
        for connection in held:
            connection.send(json.dumps({**big, "id": "first"}))  # taken at once: not queued
        time.sleep(0.3)
        held[0].send(json.dumps({**big, "id": "a"}))
        held[0].send(json.dumps({**big, "id": "c"}))
        time.sleep(0.3)  # frames on different connections arrive in no set order
        held[1].send(json.dumps({**big, "id": "b"}))
        first, second = collect(held[0], {"first", "a", "c"}), collect(held[1], {"first"})
        assert first == {"ends": {"first": "done", "a": "done", "c": "done"}, "refused": []}, first
        assert second["refused"] == ["the gateway's WebSocket queues are full; wait for answers"], (
            second
        )
        for connection in held:
            connection.close()
