"""Model pulls off the reconcile pass: a pull runs in a thread of its own and the pass only
reads where it stands. Any exception of a pull (a corrupt download, a full disk, a bug) is
that model's error: its backends wait, retried with backoff, and everything else runs on."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.config.schema import ModelSpec

log = logging.getLogger(__name__)

MAX_PULL_BACKOFF_SECONDS = 300.0

Pull = Callable[[str, ModelSpec], object]


def pull_backoff(failures: int) -> float:
    """2, 4, 8 … seconds, at most MAX_PULL_BACKOFF_SECONDS (the exponent capped)."""
    return min(2.0 ** min(failures, 32), MAX_PULL_BACKOFF_SECONDS)


@dataclass
class _PullState:
    spec: str  # the spec this state is for: a changed declaration starts afresh
    running: bool = False
    ok: bool = False
    error: str = ""
    failures: int = 0
    retry_at: float = 0.0


class ModelPuller:
    """`readiness` is what the plan reads; `request` (an executed PULL) starts a pull."""

    def __init__(self, pull: Pull, present: Callable[[str, ModelSpec], Path | None],
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self._pull = pull
        self._present = present  # the model's local file if it is there (no network)
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _PullState] = {}
        self._threads: dict[str, threading.Thread] = {}

    def _state(self, name: str, spec: ModelSpec) -> _PullState:
        key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        state = self._states.get(name)
        if state is None or state.spec != key:
            state = self._states[name] = _PullState(key)
        return state

    def readiness(self, name: str, spec: ModelSpec) -> tuple[str | None, bool]:
        """(why the model is not ready, or None; whether a pull should be started)."""
        with self._lock:
            state = self._state(name, spec)
            if state.ok:
                return None, False
            if state.running:
                return f"pulling {name} (in the background)", False
            if state.error:
                wait = state.retry_at - self._clock()
                if wait > 0:
                    return f"{state.error} (attempt {state.failures}; retrying in {wait:.0f}s)", False
                return f"{state.error} (attempt {state.failures}; retrying now)", True
        try:
            path = self._present(name, spec)
        except Exception as exc:  # a broken registry is this model's problem too
            return f"models.{name}: {exc}", True
        if path is None or path.exists():
            return None, False
        return f"{name} is not at {path} yet: pulling it", True

    def request(self, name: str, spec: ModelSpec) -> None:
        with self._lock:
            state = self._state(name, spec)
            if state.running or state.ok:
                return
            state.running = True
            thread = threading.Thread(target=self._run, args=(name, spec, state), daemon=True,
                                      name=f"pull-{name}")  # fmt: skip
            self._threads[name] = thread
        thread.start()

    def _run(self, name: str, spec: ModelSpec, state: _PullState) -> None:
        try:
            self._pull(name, spec)
        except Exception as exc:  # any failure is this model's, never the loop's
            message = str(exc) or type(exc).__name__
            if not message.startswith(f"models.{name}"):
                message = f"models.{name}: {message}"
            with self._lock:
                state.running, state.error = False, message
                state.failures += 1
                state.retry_at = self._clock() + pull_backoff(state.failures)
            log.error("pull of %s failed (attempt %d): %s", name, state.failures, message)
            return
        with self._lock:
            state.running, state.ok, state.error, state.failures = False, True, "", 0
        log.info("model %s is ready", name)

    def wait(self, timeout: float) -> None:
        """Until the pulls started so far have ended (tests, and `apply` before it exits)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
