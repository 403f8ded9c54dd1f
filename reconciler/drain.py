"""Draining a backend before the reconciler stops it, so that a rolling change loses no request.

The reconciler writes `<state dir>/drain/<backend>`; the gateway's health monitor reads that
directory every round and takes a backend named there out of routing (reported in /health as
unhealthy, detail "draining"). The reconciler waits until the gateway says so and has no
request open on it (streams included), and, for a replica, until the gateway routes to another
replica of the model, then stops it; the marker goes when the new process has been started.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

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
    seen = health.get("backends", {})
    mine = seen.get(backend)
    if mine is None:
        return True  # the gateway does not route to it at all
    if mine["healthy"] or not str(mine.get("detail", "")).startswith("draining") or mine["in_flight"]:
        return False
    others = [seen[r] for r in replicas if r in seen]
    return not others or any(o["healthy"] and not o.get("circuit_open") for o in others)


@contextmanager
def drained(state: Path, gateway_url: str | None, backend: str, replicas: list[str],
            timeout: float = DRAIN_TIMEOUT_SECONDS, ack_timeout: float = 5.0) -> Iterator[None]:  # fmt: skip
    """Drain `backend` for the duration of the block (its stop, or its stop and start).
    `ack_timeout`: how long the gateway gets to take it out of routing at all (a gateway that
    reads another state directory never does; then the stop goes ahead)."""
    marker = drain_dir(state) / backend
    _make_readable_dir(marker.parent)
    marker.write_text(f"{time.time()}\n")
    os.chmod(marker, 0o644)
    try:
        if gateway_url:
            _wait(gateway_url, backend, replicas, timeout, ack_timeout)
        yield
    finally:
        marker.unlink(missing_ok=True)


def _wait(url: str, backend: str, replicas: list[str], timeout: float, ack_timeout: float) -> None:
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", timeout=1.0).json()
        except (httpx.HTTPError, ValueError) as exc:
            log.info("gateway not reachable (%s); stopping %s without draining", exc, backend)
            return
        if gateway_ready_to_stop(health, backend, replicas):
            log.info("drained %s in %.1fs", backend, time.monotonic() - started)
            return
        mine = health.get("backends", {}).get(backend, {})
        acknowledged = str(mine.get("detail", "")).startswith("draining")
        if not acknowledged and time.monotonic() - started > ack_timeout:
            log.warning("the gateway at %s did not take %s out of routing within %.0fs "
                        "(does it share this state directory?); stopping it anyway", url, backend, ack_timeout)  # fmt: skip
            return
        last = f"{mine.get('in_flight', '?')} request(s) open, detail {mine.get('detail')!r}"
        time.sleep(0.1)
    log.warning("%s not drained within %.0fs (%s); stopping it anyway", backend, timeout, last)
