"""Choosing a backend: model names and aliases to candidates, filtered by health and open
circuits, ordered by the routing strategy. Moving bytes is `proxy.py`'s job, not this one's."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.config.schema import BackendSpec, DesiredState
from reconciler.gateway.backend_info import BackendInfo, backend_infos
from reconciler.gateway.prefix_cache import PrefixNote, PrefixSet, cached_tokens, prompt_blocks

log = logging.getLogger(__name__)

# Names clients written for the earlier ML Offload API send, meaning "whatever is served":
# they choose automatically unless gateway.routing.model_aliases maps them elsewhere.
AUTO = "auto"
PLACEHOLDERS = (AUTO, "default", "current-model", "local-model", "local-llamacpp", "local")
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
    prefixes: PrefixSet = field(default_factory=PrefixSet, repr=False)  # prompts sent here lately
    # Sent with every request and probe: the backend's own key (api_key_file). Not in repr,
    # so no log line or traceback that prints an Upstream shows it.
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    info: BackendInfo = field(
        default_factory=lambda: BackendInfo("openai", None, frozenset({"completion"}))
    )

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def context(self) -> int | None:
        """Tokens one request may hold here (backend_info.request_context)."""
        return self.info.context

    @property
    def capabilities(self) -> frozenset[str]:
        return self.info.capabilities

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


@dataclass(frozen=True)
class Resolution:
    """What a requested name means: a canonical model, or None to choose automatically."""

    model: str | None
    via: str  # 'name' (declared name or alias), 'default_model', 'model_aliases', 'auto'

    @property
    def chosen_by_gateway(self) -> bool:
        return self.via != "name"


@dataclass
class RoutingTable:
    names: dict[str, str]  # name or alias -> canonical model
    upstreams: dict[str, Upstream]
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    client_aliases: dict[str, str] = field(
        default_factory=dict
    )  # name or pattern -> model, alias or auto
    default_model: str | None = None

    @classmethod
    def from_state(cls, state: DesiredState, previous: RoutingTable | None = None) -> RoutingTable:
        """The table for `state`; backends unchanged since `previous` keep their live state
        (health, circuit, in-flight count), so a reload neither drops nor double-counts."""
        upstreams = {}
        infos = backend_infos(state)
        for name, b in state.backends.items():
            upstream = Upstream(
                name=name,
                model=b.model,
                base_url=b.base_url,
                protocol=b.wire_protocol,
                max_concurrency=state.gateway.max_concurrency_per_backend,
                served_name=served_name(b.model, state.models[b.model].source, b.wire_protocol),
                headers=backend_headers(name, b),
                info=infos[name],
                request_timeout=b.request_timeout,
                min_tokens_per_second=b.min_tokens_per_second,
                slots=llamacpp_slots(b),
            )
            old = previous.upstreams.get(name) if previous else None
            if old is not None and old.same_target(upstream):
                old.max_concurrency = upstream.max_concurrency
                old.headers = upstream.headers  # a rotated key takes effect on reload
                old.info = upstream.info
                old.request_timeout, old.slots = upstream.request_timeout, upstream.slots
                old.min_tokens_per_second = upstream.min_tokens_per_second
                upstream = old
            upstreams[name] = upstream
        names = state.model_names()
        fallbacks = {
            names[g]: [names[t] for t in ts] for g, ts in state.gateway.routing.fallbacks.items()
        }
        routing = state.gateway.routing
        return cls(names=names, upstreams=upstreams, fallbacks=fallbacks,
                   client_aliases=dict(routing.model_aliases), default_model=routing.default_model)  # fmt: skip

    def resolve_request(self, requested: str | None) -> Resolution | None:
        """A declared name or alias first; then the operator's model_aliases (exact names,
        then patterns in order); then the placeholders. None: unknown (the client's 404)."""
        if not requested:
            if self.default_model is None:
                return Resolution(None, AUTO)
            return Resolution(self.names[self.default_model], "default_model")
        if requested in self.names:
            return Resolution(self.names[requested], "name")
        target = self.client_aliases.get(requested)
        if target is None:
            target = next(
                (t for p, t in self.client_aliases.items() if fnmatch.fnmatchcase(requested, p)),
                None,
            )
        if target is not None:
            return Resolution(None if target == AUTO else self.names[target], "model_aliases")
        if requested in PLACEHOLDERS:
            return Resolution(None, AUTO)
        return None

    def describe(self) -> dict[str, Any]:
        """The routing table as `/v1/models` and `tensorforge status` show it."""
        mapped = {p: self.client_aliases.get(p, AUTO) for p in PLACEHOLDERS}
        return {
            "default_model": self.default_model or AUTO,
            "model_aliases": {**mapped, **self.client_aliases},
            "backends": {u.name: {"model": u.model, "kind": u.kind, "context_per_request": u.context,
                                  "capabilities": sorted(u.capabilities)} for u in self.upstreams.values()},
        }  # fmt: skip

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


def rendezvous(ready: list[Upstream], key: str) -> Upstream:
    """The session's backend by rendezvous hashing: a session keeps its backend while it
    stays available, and only the sessions of a backend that leaves move."""

    def weight(u: Upstream) -> bytes:
        return hashlib.blake2b(f"{key}|{u.name}".encode(), digest_size=8).digest()

    return max(ready, key=weight)


def served_name(model: str, source: str, protocol: str) -> str:
    scheme, _, rest = source.partition(":")
    if protocol == "ollama" and scheme == "ollama":
        return rest  # Ollama knows the model by its tag
    return model  # vLLM runs with --served-model-name <model>; llama.cpp ignores the name


@dataclass(frozen=True)
class Ordered:
    """The backends to try, in order, and what the first is expected to hold in its cache."""

    upstreams: list[Upstream]
    prefix: PrefixNote | None = None


class Router:
    def __init__(
        self, table: RoutingTable, strategy: str = "cache-aware", load_threshold: float = 2.0
    ):
        self.table = table
        self.strategy = strategy
        # How much busier (in requests) a preferred backend (same session, cached prefix) may
        # be than the least loaded one before the request goes to the least loaded instead:
        # a cache hit saves a prefill, not a queue behind a full backend.
        self.load_threshold = load_threshold
        self._rr = itertools.count()

    def resolve(self, requested: str) -> str | None:
        return self.table.names.get(requested)

    def members(self, model: str) -> list[Upstream]:
        return [u for u in self.table.upstreams.values() if u.model == model]

    def candidates(
        self,
        model: str,
        affinity_key: str | None = None,
        body: dict[str, Any] | None = None,
        *,
        eligible: frozenset[str] | None = None,
    ) -> list[Upstream]:
        """Available backends for `model` in the order to try them, then its fallbacks'.
        `body` (the request) lets cache-aware routing find where its prompt prefix is;
        `eligible` (from selection) keeps only the backends that fit the request."""
        return self.order(model, affinity_key, body, eligible=eligible).upstreams

    def order(
        self,
        model: str,
        affinity_key: str | None = None,
        body: dict[str, Any] | None = None,
        *,
        eligible: frozenset[str] | None = None,
    ) -> Ordered:
        """`candidates`, with what cache-aware routing expects of the first one's cache."""
        now = time.monotonic()
        ordered: list[Upstream] = []
        note = None
        for group in [model, *self.table.fallbacks.get(model, [])]:
            ready = [u for u in self.members(group) if u.available(now)]
            if eligible is not None and group == model:
                ready = [u for u in ready if u.name in eligible]
            upstreams, expected = self._order(ready, affinity_key, body)
            ordered += upstreams
            note = note or expected
        return Ordered(ordered, note)

    def _order(
        self, ready: list[Upstream], affinity_key: str | None, body: dict[str, Any] | None
    ) -> tuple[list[Upstream], PrefixNote | None]:
        if len(ready) < 2:
            return ready, None
        if self.strategy == "round-robin":
            start = next(self._rr) % len(ready)
            return ready[start:] + ready[:start], None
        by_load = sorted(ready, key=lambda u: (u.score(), u.name))
        chosen = by_load[0]
        note = None
        if self.strategy == "cache-aware":
            blocks = prompt_blocks(body) if body else []
            chosen = self._by_prefix(by_load, blocks, affinity_key)
            if blocks:
                note = chosen.prefixes.note(chosen.name, blocks)
                chosen.prefixes.record(blocks)
        elif self.strategy == "session-affinity" and affinity_key:
            chosen = self._yielding(rendezvous(ready, affinity_key), by_load[0])
        return [chosen, *(u for u in by_load if u is not chosen)], note

    def cache_reported(self, note: PrefixNote, upstream: Upstream, usage: dict[str, Any]) -> None:
        """The backend `note` is about answered, saying how much of the prompt it took from
        its cache: the record of what it holds is corrected (prefix_cache.py)."""
        counts = cached_tokens(usage)
        if counts is None or upstream.name != note.backend:
            return
        dropped = upstream.prefixes.reported(note, *counts)
        if dropped:
            log.info(
                "backend %s took %d of %d prompt tokens from its cache, not the ~%d expected: "
                "forgot %d prefix blocks sent there before",
                upstream.name, counts[1], counts[0],
                counts[0] * note.matched // note.blocks, dropped,
            )  # fmt: skip

    def _by_prefix(
        self, by_load: list[Upstream], blocks: list[int], affinity_key: str | None
    ) -> Upstream:
        """The backend holding the longest prefix of this prompt, unless it is too busy; with
        no prefix anywhere, the session's backend, else the least loaded with the most room
        in its cache (so new conversations spread instead of piling onto one replica)."""
        least = by_load[0]
        if blocks:
            matched = {u.name: u.prefixes.match(blocks) for u in by_load}
            best = max(by_load, key=lambda u: matched[u.name])  # by_load order breaks ties
            if matched[best.name] > 0:
                return self._yielding(best, least)
        if affinity_key:
            return self._yielding(rendezvous(by_load, affinity_key), least)
        idle = [u for u in by_load if u.score() <= least.score()]
        return min(idle, key=lambda u: (len(u.prefixes), u.name))

    def _yielding(self, preferred: Upstream, least: Upstream) -> Upstream:
        if preferred.score() - least.score() > self.load_threshold:
            return least
        return preferred

    def unavailable_reason(self, model: str) -> str:
        now = time.monotonic()
        members = self.members(model)
        if not members:
            return f"no backend is declared for model {model!r}"
        return "; ".join(u.why_unavailable(now) for u in members)
