"""Usage found in streams however they are cut, taken out only where the gateway asked for
it, and native Ollama streams left alone; one deadline per stream (reconciler/gateway/deadline.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve, stream_events

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.app import create_app
from reconciler.gateway.deadline import StreamDeadline
from reconciler.gateway.sse import MAX_EVENT_BYTES
from reconciler.gateway.stream_usage import UsageWatch, needs_usage_request, request_usage

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
EVENTS = stream_events(4, usage=True)  # 4 content events, the finish, usage-only, [DONE]
STREAM = b"".join(EVENTS)
WITHOUT_USAGE = b"".join(e for e in EVENTS if b'"usage"' not in e)
OLLAMA = Path(__file__).parent / "fixtures" / "protocols" / "ollama"


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def through(pieces: list[bytes], strip: bool) -> tuple[bytes, list[dict], list[bytes]]:
    counted: list[dict] = []
    watch = UsageWatch(counted.append, strip)
    outs = [watch.feed(piece) for piece in pieces]
    return b"".join(outs) + watch.flush(), counted, outs


def test_the_usage_event_is_taken_out_and_counted_once_wherever_the_stream_is_cut():
    assert USAGE in [json.loads(e[6:]).get("usage") for e in EVENTS[:-1]]  # the fixture has one
    cases = [[i] for i in range(1, len(STREAM))]  # every single cut, then random several
    rng = random.Random(7)
    cases += [rng.sample(range(1, len(STREAM)), k) for k in (2, 3, 5, 9) for _ in range(50)]
    for points in cases:
        out, counted, _ = through(cut(STREAM, points), strip=True)
        assert out == WITHOUT_USAGE, points
        assert counted == [USAGE], points


def test_without_strip_every_chunk_passes_at_once_and_usage_is_still_counted():
    rng = random.Random(8)
    for k in (1, 2, 4, 8):
        pieces = cut(STREAM, rng.sample(range(1, len(STREAM)), k))
        out, counted, outs = through(pieces, strip=False)
        assert outs == pieces and counted == [USAGE]


def test_crlf_events_and_whole_streams_in_one_chunk():
    crlf = STREAM.replace(b"\n", b"\r\n")
    for point in range(1, len(crlf)):  # a start without a CR is held, then parsed with the rest
        out, counted, _ = through(cut(crlf, [point]), strip=True)
        assert counted == [USAGE], point
        assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n"), point
    out, counted, _ = through([STREAM], strip=True)
    assert out == WITHOUT_USAGE and counted == [USAGE]


def test_in_a_chunk_of_whole_events_only_the_usage_only_event_goes():
    """A backend's short stream often arrives as one chunk: every event that mentions usage
    is read on its own. Usage on a content event (llama.cpp's /v1/completions) is counted and
    stays, "usage": null and the word in generated text are left alone, an event split over
    several data lines is read whole, and every byte around the cut passes unchanged."""
    content_usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    events = [
        b'data: {"choices":[{"delta":{"content":"say \\"usage\\": no"}}],"usage":null}\n\n',
        b"data: "
        + json.dumps({"choices": [{"text": "x"}], "usage": content_usage}).encode()
        + b"\n\n",
        b'data: {"choices":[],\ndata: "usage":' + json.dumps(USAGE).encode() + b"}\n\n",
        b"data: [DONE]\n\n",
    ]
    out, counted, _ = through([b"".join(events)], strip=True)
    assert counted == [content_usage, USAGE]
    assert out == b"".join(events[:2] + events[3:])
    out, counted, _ = through([b"".join(events)], strip=False)
    assert out == b"".join(events) and counted == [content_usage, USAGE]


def test_a_last_event_without_its_blank_line_is_counted_and_one_never_ended_is_refused():
    """A stream may end without the final blank line: what is held is counted (and the
    usage-only event still taken out) when it ends. An event that never ends is a failed
    stream (ValueError, a 502 event) once past MAX_EVENT_BYTES, not a growing buffer."""
    unended = STREAM.removesuffix(b"data: [DONE]\n\n").removesuffix(b"\n\n")
    for points in ([], [len(unended) - 5], [len(unended) // 2]):
        out, counted, _ = through(cut(unended, points), strip=True)
        assert counted == [USAGE], points
        assert out == WITHOUT_USAGE.removesuffix(b"data: [DONE]\n\n"), points
    watch = UsageWatch(lambda usage: None, strip=True)
    piece = b"data: " + b"x" * 65536
    with pytest.raises(ValueError, match="longer than"):
        for _ in range(MAX_EVENT_BYTES // len(piece) + 2):
            assert watch.feed(piece) == b""  # held, never passed half-way


def test_content_events_without_usage_pass_as_the_same_bytes():
    """The common chunk (whole events, no usage) is not re-encoded: the very bytes pass."""
    watch = UsageWatch(lambda usage: None, strip=True)
    for event in EVENTS[:4]:
        assert watch.feed(event) is event


def test_native_ollama_streams_reach_the_client_whole():
    """An Ollama backend's /api/chat stream is NDJSON, not server-sent events: it passes line
    for line, and the gateway asks Ollama for no OpenAI stream option. (It used to be read as
    one unfinished event and the client got nothing.)"""
    lines = (OLLAMA / "chat_stream.ndjson").read_bytes().splitlines(keepends=True)
    upstream = RecordedUpstream({
        ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
        ("POST", "/api/chat"): Recorded(content_type="application/x-ndjson", pieces=lines),
    })  # fmt: skip
    up, gw = free_port(), free_port()
    state = fleet_state({"box": f"http://127.0.0.1:{up}"}, kind="ollama", source="ollama:llama3.2")
    with serve(upstream, up), serve(create_app(state), gw):
        url = f"http://127.0.0.1:{gw}"
        for _ in range(100):
            if httpx.get(url + "/health").json()["backends_healthy"] == 1:
                break
            time.sleep(0.1)
        chat = {"model": "m", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
        answer = httpx.post(url + "/api/chat", json=chat, timeout=30)
        assert answer.status_code == 200
        assert answer.content.splitlines(keepends=True) == lines
        assert "stream_options" not in upstream.last("/api/chat")


# -- one deadline per stream ---------------------------------------------------------------


async def _slow(delays: list[float]):
    for delay in delays:
        await asyncio.sleep(delay)
        yield b"x"


async def _read(timer: StreamDeadline, chunks) -> bytes | None:
    """As the proxy's relay reads a stream."""
    timer.start_read()
    try:
        return await anext(chunks, None)
    except asyncio.CancelledError:
        timer.raise_if_expired()
        raise
    finally:
        timer.reading = False


def test_a_stream_that_goes_quiet_past_its_deadline_times_out():
    async def run() -> list[bytes]:
        loop = asyncio.get_running_loop()
        timer = StreamDeadline(loop.time() + 0.2)
        chunks, got = _slow([0, 0, 30]), []
        try:
            with pytest.raises(TimeoutError):
                while (chunk := await _read(timer, chunks)) is not None:
                    got.append(chunk)
            assert asyncio.current_task().cancelling() == 0  # undone: the task goes on
        finally:
            timer.close()
            await chunks.aclose()
        return got

    assert asyncio.run(asyncio.wait_for(run(), 10)) == [b"x", b"x"]


def test_a_deadline_that_passes_between_reads_fails_the_next_read():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        timer = StreamDeadline(loop.time() + 0.05)
        chunks = _slow([0, 0])
        assert await _read(timer, chunks) == b"x"
        await asyncio.sleep(0.2)  # the consumer is slow: nothing was waiting when it passed
        assert asyncio.current_task().cancelling() == 0  # so nothing was cancelled
        with pytest.raises(TimeoutError):
            await _read(timer, chunks)
        timer.close()
        await chunks.aclose()

    asyncio.run(asyncio.wait_for(run(), 10))


def test_someone_elses_cancellation_stays_a_cancellation():
    """The client leaving cancels the request's task: that must not turn into a timeout."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        timer = StreamDeadline(loop.time() + 60)
        chunks = _slow([30])
        reader = asyncio.ensure_future(_read(timer, chunks))
        await asyncio.sleep(0.05)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        timer.close()
        await chunks.aclose()

    asyncio.run(asyncio.wait_for(run(), 10))


def test_a_deadline_and_a_departing_client_at_once_stay_a_cancellation():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        timer = StreamDeadline(loop.time() + 0.1)
        chunks = _slow([30])
        reader = asyncio.ensure_future(_read(timer, chunks))
        await asyncio.sleep(0.05)
        loop.call_at(timer._timer.when(), reader.cancel)  # the client leaves as it expires
        with pytest.raises(asyncio.CancelledError):
            await reader
        timer.close()
        await chunks.aclose()

    asyncio.run(asyncio.wait_for(run(), 10))


def test_usage_is_asked_for_without_losing_or_changing_any_other_field():
    cases = [
        b'{"model":"m","messages":[{"role":"user","content":"}"}],"stream":true}',
        b'{"model": "m", "stream": true}\n  ',  # trailing whitespace
        b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true}}',
        b'{"model":"m","stream":true,"stream_options":null}',
        '{"model":"m","stream":true}'.encode("utf-16"),  # JSON in UTF-16: json.loads reads it
    ]
    for raw in cases:
        body = json.loads(raw)
        exchange, sent = request_usage(Exchange("/v1/chat/completions", body, "m"), raw)
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        expected = {**body, "stream_options": {**options, "include_usage": True}}
        assert json.loads(sent) == exchange.body == expected, raw
        assert body == json.loads(raw)  # the client's own body is left as it was


def test_usage_is_asked_for_only_where_it_is_an_openai_stream_option():
    """Anthropic Messages and OpenAI Responses streams carry usage in events of their own
    (message_delta, response.completed) with `event:` lines: they pass as the backend sent them."""
    stream = {"model": "m", "stream": True}
    assert needs_usage_request(Exchange("/v1/chat/completions", stream, "m"), True)
    assert needs_usage_request(Exchange("/v1/completions", stream, "m"), True)
    for endpoint in ("/v1/messages", "/v1/responses", "/infill", "/api/chat"):
        assert not needs_usage_request(Exchange(endpoint, stream, "m"), True), endpoint
    asked = {**stream, "stream_options": {"include_usage": True}}
    assert not needs_usage_request(Exchange("/v1/chat/completions", asked, "m"), True)


def test_an_anthropic_messages_stream_passes_byte_for_byte():
    """Shaped as Anthropic's streaming documentation shows it (event: lines, usage in
    message_start and message_delta), from a llama.cpp backend's /v1/messages. It used to
    lose every event: line and the message_delta event."""
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","content":[],"usage":{"input_tokens":5,"output_tokens":1}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi"}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":2}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    upstream = RecordedUpstream({
        ("GET", "/health"): Recorded(body=b'{"status":"ok"}'),
        ("POST", "/v1/messages"): Recorded(content_type="text/event-stream", pieces=events),
    })  # fmt: skip
    up, gw = free_port(), free_port()
    state = fleet_state({"cpu": f"http://127.0.0.1:{up}"}, kind="llamacpp")
    app = create_app(state)
    with serve(upstream, up), serve(app, gw):
        url = f"http://127.0.0.1:{gw}"
        for _ in range(100):
            if httpx.get(url + "/health").json()["backends_healthy"] == 1:
                break
            time.sleep(0.1)
        ask = {"model": next(iter(app.table.names)), "max_tokens": 5, "stream": True,
               "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        answer = httpx.post(url + "/v1/messages", json=ask, timeout=30)
        assert answer.status_code == 200
        assert answer.content == b"".join(events)
        assert "stream_options" not in upstream.last("/v1/messages")
