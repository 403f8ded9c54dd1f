"""Draining a backend before the reconciler stops it, so that a rolling change loses no request.

The reconciler writes `<drain dir>/<backend>` (a DRAIN action; the mark holds when); the
gateway's health monitor reads that directory every round and takes a backend named there out
of routing (reported in /health as unhealthy, detail "draining"). Each pass observes every
mark (`drain_states`: one question to the gateway) and the plan holds the stop until the
gateway has no request open on it (streams included) and, for a replica, routes to another
replica of the model; then it stops it. The marker goes when the new process has been started.
Marks are the state: a restarted reconciler, and `tensorforge plan`, see the same drains.

Needed because a stopped backend cannot be relied on to finish what it has: llama.cpp through
xllamacpp stops listening at SIGTERM but stalls its open streams until it is killed, and any
backend keeps answering on connections the gateway already holds open. Without a reachable
gateway (none declared, or not up yet) nothing is waited for.

Where the gateway is its own service under another user (a systemd unit, the NixOS module),
both get `TF_DRAIN_DIR`, and the directory and its markers are world-readable whatever the
umask: they hold only backend names (public in the desired state) and a timestamp."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from reconciler.plan import DrainState

log = logging.getLogger(__name__)

DRAIN_DIR = "drain"
DRAIN_DIR_ENV = "TF_DRAIN_DIR"
DRAIN_TIMEOUT_SECONDS = 30.0
DRAINING_DETAIL = "draining: the reconciler is about to stop it"


def drain_dir(state: Path) -> Path:
    """TF_DRAIN_DIR, else <state dir>/drain."""
    if env := os.environ.get(DRAIN_DIR_ENV):
        return Path(env)
    return state / DRAIN_DIR


def _make_readable_dir(directory: Path) -> None:
    """Create `directory` (and missing parents) readable by the gateway's user."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory, *missing):
        try:
            os.chmod(path, 0o755)
        except OSError:
            pass  # not ours (an existing RuntimeDirectory): its owner chose the mode


def draining(directory: Path | None) -> set[str]:
    """Backends marked for draining (what the gateway reads each health round)."""
    if directory is None:
        return set()
    try:
        return {p.name for p in directory.iterdir() if not p.name.startswith(".")}
    except OSError:
        return set()


def gateway_ready_to_stop(health: dict, backend: str, replicas: list[str]) -> bool:
    """True when the gateway routes nothing to `backend` any more, and (if the model has other
    replicas) routes to at least one of them."""
    seen = health.get("backends")
    if not isinstance(seen, dict):
        return False  # a summary without detail says nothing: wait (ack_timeout still applies)
    mine = seen.get(backend)
    if mine is None:
        return True  # the gateway does not route to it at all
    if mine["healthy"] or not str(mine.get("detail", "")).startswith("draining") or mine["in_flight"]:
        return False
    others = [seen[r] for r in replicas if r in seen]
    return not others or any(o["healthy"] and not o.get("circuit_open") for o in others)


def read_marks(directory: Path | None) -> dict[str, float]:
    """Backend -> when its drain began (unix time), from the marks on disk."""
    marks: dict[str, float] = {}
    for backend in draining(directory):
        path = directory / backend  # type: ignore[operator]
        try:
            marks[backend] = float(path.read_text().strip() or 0)
        except (OSError, ValueError):
            try:
                marks[backend] = path.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
    return marks


@dataclass(frozen=True)
class DrainRule:
    """What a backend's drain waits for: its replicas, its drain_timeout."""

    replicas: list[str]
    timeout: float = DRAIN_TIMEOUT_SECONDS


def drain_states(
    marks: dict[str, float],
    gateway_url: str | None,
    rules: dict[str, DrainRule],
    now: float,
    ack_timeout: float = 5.0,
) -> dict[str, DrainState]:
    """Where each marked backend's drain stands: one /health question to the gateway for all
    of them. A backend may be stopped once drained, or without draining when there is no
    gateway to ask, it does not answer, or it never took the backend out of routing within
    `ack_timeout` (it reads another drain directory), or past the backend's drain_timeout."""
    if not marks:
        return {}
    if not gateway_url:
        return {b: DrainState(True, "no gateway to drain from") for b in marks}
    try:
        health = httpx.get(f"{gateway_url}/health", timeout=1.0).json()
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        return {b: DrainState(True, f"gateway not reachable ({exc}); not draining") for b in marks}
    states = {}
    for backend, started in marks.items():
        rule = rules.get(backend, DrainRule([]))
        waited = now - started
        seen = health.get("backends") if isinstance(health, dict) else None
        mine = seen.get(backend, {}) if isinstance(seen, dict) else {}
        if gateway_ready_to_stop(health, backend, rule.replicas):
            states[backend] = DrainState(True, f"drained in {waited:.1f}s")
        elif not str(mine.get("detail", "")).startswith("draining") and waited > ack_timeout:
            states[backend] = DrainState(True, f"the gateway at {gateway_url} did not take it out of routing "
                                               f"within {ack_timeout:.0f}s (same TF_DRAIN_DIR?)")  # fmt: skip
        elif waited > rule.timeout:
            states[backend] = DrainState(True, f"not drained within {rule.timeout:g}s; stopping it anyway")
        else:
            detail = f"{mine.get('in_flight', '?')} request(s) open, detail {mine.get('detail')!r}"
            states[backend] = DrainState(False, f"{detail} ({waited:.0f}s of {rule.timeout:g}s)")
    return states


@dataclass
class _Drain:
    started: float  # monotonic
    last: str = "no answer yet"


class Drainer:
    """Drains as the reconcile loop needs them: never blocking a pass. `ready` marks a backend
    the first time it is asked, then asks the gateway once per call whether the backend may
    be stopped now; the caller stops it when the answer is yes, and calls `end`. Meanwhile the
    loop goes on supervising everything else (a long `drain_timeout` holds up only this
    backend's change)."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.clock = clock
        self.active: dict[str, _Drain] = {}

    def mark(self, backend: str) -> None:
        """Take `backend` out of the gateway's routing (a DRAIN action)."""
        if backend not in self.active:
            self._mark(backend)
            self.active[backend] = _Drain(self.clock())
            log.info("draining %s before it stops", backend)

    def _mark(self, backend: str) -> None:
        _make_readable_dir(self.directory)
        marker = self.directory / backend
        marker.write_text(f"{time.time()}\n")
        os.chmod(marker, 0o644)

    def ready(self, backend: str, gateway_url: str | None, replicas: list[str],
              timeout: float = DRAIN_TIMEOUT_SECONDS, ack_timeout: float = 5.0) -> bool:  # fmt: skip
        """True when `backend` may be stopped now. `ack_timeout`: how long the gateway gets to
        take it out of routing at all (a gateway reading another drain directory never does;
        then the stop goes ahead, with a warning)."""
        drain = self.active.get(backend)
        if drain is None:
            self._mark(backend)
            drain = self.active[backend] = _Drain(self.clock())
            log.info("draining %s before it stops", backend)
        if not gateway_url:
            return True
        waited = self.clock() - drain.started
        try:
            health = httpx.get(f"{gateway_url}/health", timeout=1.0).json()
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            log.info("gateway not reachable (%s); stopping %s without draining", exc, backend)
            return True
        if gateway_ready_to_stop(health, backend, replicas):
            log.info("drained %s in %.1fs", backend, waited)
            return True
        mine = health.get("backends", {}).get(backend, {})
        if not str(mine.get("detail", "")).startswith("draining") and waited > ack_timeout:
            log.warning("the gateway at %s did not take %s out of routing within %.0fs "
                        "(does it read the same drain directory, TF_DRAIN_DIR?); stopping it anyway",
                        gateway_url, backend, ack_timeout)  # fmt: skip
            return True
        drain.last = f"{mine.get('in_flight', '?')} request(s) open, detail {mine.get('detail')!r}"
        if waited > timeout:
            log.warning("%s not drained within %.0fs (%s); stopping it anyway", backend, timeout, drain.last)
            return True
        return False

    def waiting(self, backend: str) -> str:
        """Why a backend being drained is not stopped yet (for the plan's WAIT reason)."""
        drain = self.active.get(backend)
        return f"draining: {drain.last}" if drain else "draining"

    def end(self, backend: str) -> None:
        """The backend was stopped and started again (or the change was dropped): route to it."""
        self.active.pop(backend, None)
        (self.directory / backend).unlink(missing_ok=True)

    def clear_stale(self) -> None:
        """Remove marks this drainer did not write: a reconciler killed mid-drain left them,
        and the gateway would keep those backends out of routing for good."""
        for backend in draining(self.directory) - set(self.active):
            log.info("removing a stale drain mark for %s", backend)
            (self.directory / backend).unlink(missing_ok=True)

    def end_all_but(self, backends: set[str]) -> None:
        """Drop drains the plan no longer asks for (the change was reverted, say)."""
        for backend in set(self.active) - backends:
            log.info("drain of %s dropped: no stop planned any more", backend)
            self.end(backend)
