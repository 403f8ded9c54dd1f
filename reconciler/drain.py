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
    if (
        mine["healthy"]
        or not str(mine.get("detail", "")).startswith("draining")
        or mine["in_flight"]
    ):
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


def gateway_health(gateway_url: str | None) -> dict | str:
    """The gateway's /health as this host sees it (with per-backend detail), or why not."""
    if not gateway_url:
        return "no gateway"
    try:
        health = httpx.get(f"{gateway_url}/health", timeout=1.0).json()
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        return f"gateway not reachable ({exc})"
    return health if isinstance(health, dict) else "gateway answered no JSON object"


def wedged_backends(health: dict | str) -> dict[str, str]:
    """Backends the gateway reports wedged (a llama.cpp slot left busy by a cancelled request,
    reconciler/gateway/slots.py): backend -> why. The reconciler restarts them."""
    seen = health.get("backends") if isinstance(health, dict) else None
    if not isinstance(seen, dict):
        return {}
    return {b: str(d["wedged"]) for b, d in seen.items() if isinstance(d, dict) and d.get("wedged")}


def drain_states(
    marks: dict[str, float],
    health: dict | str,
    rules: dict[str, DrainRule],
    now: float,
    ack_timeout: float = 5.0,
) -> dict[str, DrainState]:
    """Where each marked backend's drain stands, from the gateway's one /health answer
    (`gateway_health`). A backend may be stopped once drained, or without draining when there
    is no gateway to ask, it does not answer, or it never took the backend out of routing
    within `ack_timeout` (it reads another drain directory), or past its drain_timeout."""
    if not marks:
        return {}
    if health == "no gateway":
        return {b: DrainState(True, "no gateway to drain from") for b in marks}
    if isinstance(health, str):
        return {b: DrainState(True, f"{health}; not draining") for b in marks}
    states = {}
    for backend, started in marks.items():
        rule = rules.get(backend, DrainRule([]))
        waited = now - started
        seen = health.get("backends") if isinstance(health, dict) else None
        mine = seen.get(backend, {}) if isinstance(seen, dict) else {}
        if gateway_ready_to_stop(health, backend, rule.replicas):
            states[backend] = DrainState(True, f"drained {backend} in {waited:.1f}s")
        elif not str(mine.get("detail", "")).startswith("draining") and waited > ack_timeout:
            states[backend] = DrainState(True, "the gateway did not take it out of routing "
                                               f"within {ack_timeout:.0f}s (same TF_DRAIN_DIR?)")  # fmt: skip
        elif waited > rule.timeout:
            states[backend] = DrainState(
                True, f"not drained within {rule.timeout:g}s; stopping it anyway"
            )
        else:
            detail = f"{mine.get('in_flight', '?')} request(s) open, detail {mine.get('detail')!r}"
            states[backend] = DrainState(False, f"{detail} ({waited:.0f}s of {rule.timeout:g}s)")
    return states


class Drainer:
    """Writes and removes the marks (the DRAIN and UNDRAIN actions, and the end of a drain
    once its backend was stopped or restarted). Where a drain stands is observed each pass
    with `drain_states`, from the marks on disk, never remembered here."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.active: dict[str, float] = {}  # marks this drainer wrote and has not ended -> when

    def mark(self, backend: str) -> None:
        """Take `backend` out of the gateway's routing (a DRAIN action)."""
        _make_readable_dir(self.directory)
        marker = self.directory / backend
        marker.write_text(f"{time.time()}\n")
        os.chmod(marker, 0o644)
        self.active[backend] = time.time()
        log.info("draining %s before it stops", backend)

    def ready(self, backend: str, gateway_url: str | None, replicas: list[str],
              timeout: float = DRAIN_TIMEOUT_SECONDS, ack_timeout: float = 5.0) -> bool:  # fmt: skip
        """Mark `backend` if it is not yet, then True when it may be stopped now (one pass of
        the loop's drain, for callers outside it)."""
        marks = read_marks(self.directory)
        if backend not in marks:
            self.mark(backend)
            marks[backend] = time.time()
        rules = {backend: DrainRule(replicas, timeout)}
        health = gateway_health(gateway_url)
        return drain_states({backend: marks[backend]}, health, rules, time.time(), ack_timeout)[
            backend
        ].drained

    def end(self, backend: str) -> None:
        """The backend was stopped and started again (or the change was dropped): route to it."""
        self.active.pop(backend, None)
        (self.directory / backend).unlink(missing_ok=True)

    def clear_stale(self) -> None:
        """Remove marks this drainer did not write (left by a reconciler killed mid-drain)."""
        for backend in draining(self.directory) - set(self.active):
            log.info("removing a stale drain mark for %s", backend)
            (self.directory / backend).unlink(missing_ok=True)

    def end_all_but(self, backends: set[str]) -> None:
        """Drop the drains of this drainer not in `backends`."""
        for backend in set(self.active) - backends:
            self.end(backend)
