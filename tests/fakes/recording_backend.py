"""A fake backend that records every request it receives and answers each path with a
recorded response, streamed or whole as the request asks (`stream: true` picks the
`stream` recording). Used where the real llama.cpp server cannot show the behaviour: SmolLM2
calls no tools and has no fill-in-the-middle tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .upstreams import Recorded, RecordedUpstream, lifespan, read_body

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "protocols"


def recorded_sse(path: Path) -> Recorded:
    """An SSE recording replayed one event per write, as a server sends them."""
    events = [e + b"\n\n" for e in path.read_bytes().split(b"\n\n") if e.strip()]
    return Recorded(content_type="text/event-stream", pieces=events)


@dataclass
class Route:
    whole: Recorded
    stream: Recorded | None = None


@dataclass
class RecordingBackend:
    """routes: path -> Route. `requests` keeps (path, JSON body) of every POST, in order."""

    routes: dict[str, Route]
    requests: list[tuple[str, dict]] = field(default_factory=list)
    served: tuple[str, ...] = ("m",)  # what /v1/models lists: vLLM's health probe checks the name

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        raw = await read_body(receive)
        body = json.loads(raw) if raw else {}
        if scope["method"] == "POST":
            self.requests.append((scope["path"], body))
        route = self.routes.get(scope["path"])
        if scope["method"] == "GET":  # health probes (/health, /v1/models)
            listed = [{"id": name, "object": "model"} for name in self.served]
            answer = Recorded(
                body=json.dumps({"status": "ok", "object": "list", "data": listed}).encode()
            )
        elif route is None:
            answer = Recorded(status=404, body=b'{"error":"not recorded"}')
        else:
            answer = route.stream if body.get("stream") is True and route.stream else route.whole
        await RecordedUpstream({(scope["method"], scope["path"]): answer})(
            scope, _replay(raw), send
        )

    def last(self, path: str) -> dict:
        return next(body for p, body in reversed(self.requests) if p == path)


def _replay(raw: bytes):
    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return receive


def llamacpp_tools_backend() -> RecordingBackend:
    """llama.cpp's server answering every chat with a recorded tool call."""
    return RecordingBackend({
        "/v1/chat/completions": Route(Recorded(body=(FIXTURES / "llamacpp" / "chat_tool_call.json").read_bytes()),
                                      recorded_sse(FIXTURES / "llamacpp" / "chat_tool_call_stream.sse")),
        "/v1/completions": Route(Recorded(body=json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                                                           "usage": {"prompt_tokens": 2, "completion_tokens": 1}}).encode())),
        "/infill": Route(Recorded(body=(FIXTURES / "llamacpp" / "infill.json").read_bytes()),
                         recorded_sse(FIXTURES / "llamacpp" / "infill_stream.sse")),
        "/generate": Route(Recorded(body=(FIXTURES / "tgi" / "generate.json").read_bytes())),
    })  # fmt: skip
