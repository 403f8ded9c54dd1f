"""Choosing a backend: model names and aliases to candidates, filtered by health and open
circuits, ordered by the routing strategy. Moving bytes is `proxy.py`'s job, not this one's."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.config.schema import BackendSpec, DesiredState

CIRCUIT_FAILURES = 3  # consecutive failures that open a backend's circuit
CIRCUIT_COOLDOWN_SECONDS = 10.0
# What a cold model costs in the least-load score, in requests: loading a model takes seconds
# to minutes, longer than a few requests queued on a replica that already holds it.
COLD_MODEL_PENALTY = 8.0


@dataclass
class Upstream:
    """One backend as the gateway sees it, with its live routing state."""

    name: str
    model: str
    base_url: str
    protocol: str
    max_concurrency: int = 64
    healthy: bool = False
    health_detail: str = "not probed yet"
    in_flight: int = 0
    consecutive_failures: int = 0
    open_until: float = 0.0
    served_name: str = ""  # the name the backend itself knows the model by
    backend_limit: int | None = None  # concurrent requests the backend says it accepts
    reported_load: float = 0.0  # running + queued requests from the backend's own metrics
    kv_usage: float | None = None  # KV-cache (VRAM) fraction in use, where the backend says
    gpu_free: float | None = None  # free fraction of its fullest GPU, from NVML (local backends)
    warm: bool | None = None  # model in the backend's memory (Ollama /api/ps); None: not known
    # Sent with every request and probe: the backend's own key (api_key_file). Not in repr,
    # so no log line or traceback that prints an Upstream shows it.
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    request_timeout: float = 600.0  # seconds from a request's first byte to its last
    min_tokens_per_second: float = 1.0  # slower than this, a generation counts as stuck
    # llama.cpp's slots (--parallel), where known: the backend takes slots + 1 requests (one
    # waiting for the next free slot) and the gateway queues 2 x slots more; past that, 429.
    # More made llama-server drop connections, which used to open every circuit.
    slots: int | None = None
    wedged: str | None = None  # a slot left busy by a cancelled request: out of routing
    quiet_until: float = 0.0  # no /metrics scrapes before this (monotonic): see slots.py
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque, repr=False)

    @property
    def limit(self) -> int:
        """Requests the gateway keeps open here: ours, the backend's own or its slots' if lower."""
        limits = [self.max_concurrency]
        if self.backend_limit is not None:
            limits.append(self.backend_limit)
        if self.slots is not None:
            limits.append(self.slots + 1)
        return min(limits)

    @property
    def queue_limit(self) -> int:
        """Requests that may wait in the gateway for room here (0: refuse at once)."""
        return 2 * self.slots if self.slots is not None else 0

    def release(self) -> None:
        """One request here ended: the longest waiter, if any, may go."""
        self.in_flight -= 1
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def score(self) -> float:
        """Lower is better: our in-flight requests, the backend's own queue, and penalties
        that grow as its KV cache and its GPUs' memory (the VRAM it has left) fill up; a
        backend about to run out of either goes last, and one that would first have to load
        the model waits behind a few requests on one that holds it."""
        pressure = COLD_MODEL_PENALTY if self.warm is False else 0.0
        if self.kv_usage is not None:
            pressure += 2.0 * self.kv_usage + (100.0 if self.kv_usage >= 0.98 else 0.0)
        if self.gpu_free is not None:
            pressure += (1.0 - self.gpu_free) + (100.0 if self.gpu_free < 0.02 else 0.0)
        return self.in_flight + self.reported_load + pressure

    def same_target(self, other: Upstream) -> bool:
        return (self.base_url, self.protocol, self.model, self.served_name) == (
            other.base_url, other.protocol, other.model, other.served_name
        )  # fmt: skip

    def available(self, now: float) -> bool:
        return self.healthy and self.wedged is None and now >= self.open_until

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.open_until = 0.0

    def record_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= CIRCUIT_FAILURES:
            self.open_until = now + CIRCUIT_COOLDOWN_SECONDS

    @property
    def circuit_open(self) -> bool:
        return time.monotonic() < self.open_until

    def why_unavailable(self, now: float) -> str:
        if not self.healthy:
            return f"{self.name}: {self.health_detail}"
        if self.wedged is not None:
            return f"{self.name}: {self.wedged}"
        return f"{self.name}: circuit open after {self.consecutive_failures} failures"


@dataclass
class RoutingTable:
    names: dict[str, str]  # name or alias -> canonical model
    upstreams: dict[str, Upstream]
    fallbacks: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: DesiredState, previous: RoutingTable | None = None) -> RoutingTable:
        """The table for `state`; backends unchanged since `previous` keep their live state
        (health, circuit, in-flight count), so a reload neither drops nor double-counts."""
        upstreams = {}
        for name, b in state.backends.items():
            upstream = Upstream(
                name=name,
                model=b.model,
                base_url=b.base_url,
                protocol=b.wire_protocol,
                max_concurrency=state.gateway.max_concurrency_per_backend,
                served_name=served_name(b.model, state.models[b.model].source, b.wire_protocol),
                headers=backend_headers(name, b),
                request_timeout=b.request_timeout,
                min_tokens_per_second=b.min_tokens_per_second,
                slots=llamacpp_slots(b),
            )
            old = previous.upstreams.get(name) if previous else None
            if old is not None and old.same_target(upstream):
                old.max_concurrency = upstream.max_concurrency
                old.headers = upstream.headers  # a rotated key takes effect on reload
                old.request_timeout, old.slots = upstream.request_timeout, upstream.slots
                old.min_tokens_per_second = upstream.min_tokens_per_second
                upstream = old
            upstreams[name] = upstream
        names = state.model_names()
        fallbacks = {names[g]: [names[t] for t in ts] for g, ts in state.gateway.routing.fallbacks.items()}
        return cls(names=names, upstreams=upstreams, fallbacks=fallbacks)

    def served_models(self) -> list[str]:
        """Canonical models with at least one backend, in declaration order."""
        return list(dict.fromkeys(u.model for u in self.upstreams.values()))


def llamacpp_slots(backend: BackendSpec) -> int | None:
    """A llama.cpp backend's slots: `parallel`, when it runs here or its parallel is declared."""
    if backend.wire_protocol != "llamacpp":
        return None
    if backend.managed or "parallel" in backend.model_fields_set:
        return backend.parallel
    return None


def backend_headers(name: str, backend: BackendSpec) -> dict[str, str]:
    """`Authorization: Bearer <key>` from the backend's api_key_file, else nothing."""
    if backend.api_key_file is None:
        return {}
    try:
        key = Path(backend.api_key_file).read_text().strip()
    except OSError as exc:
        raise ValueError(
            f"backends.{name}.api_key_file: cannot read {backend.api_key_file}: {exc.strerror}; "
            "make it readable by the gateway or remove the setting"
        ) from None
    if not key or any(c.isspace() for c in key):
        raise ValueError(
            f"backends.{name}.api_key_file: {backend.api_key_file} must hold one key on one line"
        )
    return {"authorization": f"Bearer {key}"}


def served_name(model: str, source: str, protocol: str) -> str:
    scheme, _, rest = source.partition(":")
    if protocol == "ollama" and scheme == "ollama":
        return rest  # Ollama knows the model by its tag
    return model  # vLLM runs with --served-model-name <model>; llama.cpp ignores the name


class Router:
    def __init__(self, table: RoutingTable, strategy: str = "least-load"):
        self.table = table
        self.strategy = strategy
        self._rr = itertools.count()

    def resolve(self, requested: str) -> str | None:
        return self.table.names.get(requested)

    def members(self, model: str) -> list[Upstream]:
        return [u for u in self.table.upstreams.values() if u.model == model]

    def candidates(self, model: str, affinity_key: str | None = None) -> list[Upstream]:
        """Available backends for `model` in the order to try them, then its fallbacks'."""
        now = time.monotonic()
        ordered: list[Upstream] = []
        for group in [model, *self.table.fallbacks.get(model, [])]:
            ready = [u for u in self.members(group) if u.available(now)]
            ordered += self._order(ready, affinity_key)
        return ordered

    def _order(self, ready: list[Upstream], affinity_key: str | None) -> list[Upstream]:
        if len(ready) < 2:
            return ready
        if self.strategy == "session-affinity" and affinity_key:
            # Rendezvous hashing: a session keeps its backend while it stays healthy, and only
            # the sessions of a backend that leaves move.
            def score(u: Upstream) -> bytes:
                return hashlib.blake2b(f"{affinity_key}|{u.name}".encode(), digest_size=8).digest()

            return sorted(ready, key=score, reverse=True)
        if self.strategy == "round-robin":
            start = next(self._rr) % len(ready)
            return ready[start:] + ready[:start]
        return sorted(ready, key=lambda u: (u.score(), u.name))

    def unavailable_reason(self, model: str) -> str:
        now = time.monotonic()
        members = self.members(model)
        if not members:
            return f"no backend is declared for model {model!r}"
        return "; ".join(u.why_unavailable(now) for u in members)
