"""The interface every protocol adapter implements: build the backend's request from an
OpenAI one, translate the answer back to OpenAI's shapes, and read the backend's load."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


class Unsupported(Exception):
    """The backend's protocol has no equivalent of this endpoint."""

    code = "unsupported_endpoint"


class UnsupportedValue(Unsupported):
    """The backend cannot serve this value of a request field (named by `param`)."""

    code = "unsupported_value"

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str
    content: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Exchange:
    """One client request as the adapter sees it."""

    endpoint: str  # the OpenAI path the client called
    body: dict[str, Any]
    requested_model: str  # what the client called the model (names the answer)


@dataclass(frozen=True)
class BackendLoad:
    """What a backend reports about itself on /metrics."""

    requests: float = 0.0  # running plus queued requests
    kv_usage: float | None = None  # fraction of KV cache (VRAM) in use, where reported


JSON_HEADERS = {"content-type": "application/json"}


class Adapter:
    """Default behaviour: the backend speaks OpenAI's API; bytes pass through untouched."""

    protocol = "openai"
    metrics_path: str | None = None
    # Prometheus series summed into BackendLoad.requests, and the KV-cache usage series.
    load_series: tuple[str, ...] = ()
    kv_series: tuple[str, ...] = ()
    info_path: str | None = None  # where the backend describes its own limits
    # Where a backend that loads models on demand lists the ones it holds in memory: a
    # replica that must load the model first answers seconds later than one that has it.
    loaded_path: str | None = None
    # Its streams carry a usage event when asked with stream_options.include_usage: the gateway
    # then asks for every stream, to count the tokens of clients that did not.
    stream_usage_option = False

    def parse_info(self, info: dict[str, Any]) -> int | None:
        """The most concurrent requests the backend accepts, from its info document."""
        return None

    def holds_model(self, document: dict[str, Any], served_model: str) -> bool | None:
        """From the `loaded_path` document: is `served_model` in memory (None: cannot tell)."""
        return None

    def build_request(self, exchange: Exchange, raw: bytes, served_model: str) -> UpstreamRequest:
        return UpstreamRequest("POST", exchange.endpoint, raw, JSON_HEADERS)

    def passes_through(self, endpoint: str) -> bool:
        """True when the backend's answer is already OpenAI's, byte for byte."""
        return True

    def convert_response(self, exchange: Exchange, content: bytes) -> bytes:
        return content

    async def convert_stream(
        self, exchange: Exchange, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    def parse_load(self, text: str) -> BackendLoad:
        totals = parse_prometheus(text, (*self.load_series, *self.kv_series))
        kv = [totals[name] for name in self.kv_series if name in totals]
        return BackendLoad(
            requests=sum(totals.get(name, 0.0) for name in self.load_series),
            kv_usage=max(kv) if kv else None,
        )


def parse_prometheus(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum the samples of the wanted series over all their labels."""
    wanted = set(names)
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0].strip()
        if name not in wanted:
            # Some exporters append a timestamp: "name{..} value ts".
            series, _, value2 = series.rpartition(" ")
            name = series.split("{", 1)[0].strip()
            if name not in wanted:
                continue
            value = value2
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals
