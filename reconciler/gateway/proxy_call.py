"""One request as the proxy takes it: apart from proxy.py so that what observes the proxy
(observers.py, telemetry, events) can name it without importing the proxy."""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.prefix_cache import PrefixNote
from reconciler.gateway.request_id import new_id


@dataclass(frozen=True)
class ProxyCall:
    # For telemetry and events (keyword-only: positional calls are unchanged).
    request_id: str = field(default_factory=new_id, compare=False, kw_only=True)
    exchange: Exchange
    raw: bytes
    model: str  # canonical model name
    stream: bool
    affinity_key: str | None = None
    client: str | None = None  # the API key's client name, when keys are on
    eligible: frozenset[str] | None = (
        None  # backends that fit the request (selection.py); None: all
    )
    trace: tuple[tuple[str, str], ...] = ()  # x-request-id and traceparent, sent to the backend
    prefix: PrefixNote | None = None  # what the routing expects of the first backend's cache
