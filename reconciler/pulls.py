"""Model pulls off the reconcile pass: a pull runs in a thread of its own and the pass only
reads where it stands. Any exception of a pull (a corrupt download, a full disk, a bug) is
that model's error: its backends wait, retried with backoff, and everything else runs on.

Where a pull stands is kept in `<state dir>/pulls/<model>.json` (running, by which process;
the last error and when to retry), so `tensorforge plan` in another process sees what the
supervisor's next pass will see."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from reconciler.config.schema import ModelSpec
from reconciler.drivers.atomic import sweep_orphans, write_atomic

log = logging.getLogger(__name__)

MAX_PULL_BACKOFF_SECONDS = 300.0
PULLS_DIR = "pulls"

Pull = Callable[[str, ModelSpec], object]


def pull_backoff(failures: int) -> float:
    """2, 4, 8 … seconds, at most MAX_PULL_BACKOFF_SECONDS (the exponent capped)."""
    return min(2.0 ** min(failures, 32), MAX_PULL_BACKOFF_SECONDS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PullState:
    spec: str  # the declaration this is about: a changed one starts afresh
    pid: int = 0  # the process pulling it now (0: none)
    error: str = ""
    failures: int = 0
    retry_at: float = 0.0


class ModelPuller:
    """`readiness` is what the plan reads; `request` (an executed PULL) starts a pull."""

    def __init__(self, state_dir: Path, pull: Pull, present: Callable[[str, ModelSpec], Path | None],
                 clock: Callable[[], float] | None = None):  # fmt: skip
        self.directory = state_dir / PULLS_DIR  # written by the first pull, not by `plan`
        sweep_orphans(self.directory)  # left by a reconciler killed mid-write
        self._pull = pull
        self._present = present  # the model's local file if it is there (no network)
        self._clock = clock or (lambda: time.time())  # looked up at each call: tests may freeze it
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}

    # -- state on disk ---------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def _load(self, name: str, spec: ModelSpec) -> PullState:
        key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        try:
            state = PullState(**json.loads(self._path(name).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return PullState(key)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable pull state %s: %s", self._path(name), exc)
            return PullState(key)
        return state if state.spec == key else PullState(key)

    def _save(self, name: str, state: PullState) -> None:
        write_atomic(self._path(name), json.dumps(asdict(state)))

    # -- the plan's input ------------------------------------------------------------------
    def readiness(self, name: str, spec: ModelSpec) -> tuple[str | None, bool]:
        """(why the model is not ready, or None; whether a pull should be started)."""
        with self._lock:
            state = self._load(name, spec)
        if state.pid and _alive(state.pid):
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

    # -- the PULL action -------------------------------------------------------------------
    def request(self, name: str, spec: ModelSpec) -> None:
        with self._lock:
            thread = self._threads.get(name)
            if thread is not None and thread.is_alive():
                return
            state = self._load(name, spec)
            state.pid = os.getpid()
            self._save_quietly(name, state)
            thread = threading.Thread(
                target=self._run, args=(name, spec), daemon=True, name=f"pull-{name}"
            )
            self._threads[name] = thread
        thread.start()

    def _run(self, name: str, spec: ModelSpec) -> None:
        try:
            self._pull(name, spec)
        except Exception as exc:  # any failure is this model's, never the loop's
            message = str(exc) or type(exc).__name__
            if not message.startswith(f"models.{name}"):
                message = f"models.{name}: {message}"
            with self._lock:
                state = self._load(name, spec)
                state.pid, state.error = 0, message
                state.failures += 1
                state.retry_at = self._clock() + pull_backoff(state.failures)
                self._save_quietly(name, state)
            log.error("pull of %s failed (attempt %d): %s", name, state.failures, message)
            return
        with self._lock:
            self._path(name).unlink(missing_ok=True)
        log.info("model %s is ready", name)

    def _save_quietly(self, name: str, state: PullState) -> None:
        try:
            self._save(name, state)
        except OSError as exc:  # a full disk is likely why the pull failed: say so, go on
            log.error("cannot record the pull state of %s: %s", name, exc)

    def wait(self, timeout: float) -> None:
        """Until the pulls started so far have ended (tests, and `apply` before it exits)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
