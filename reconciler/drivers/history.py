"""What a driver remembers about each unit between passes, the same for every driver: failed
starts and their backoff, a (re)start on trial until it is healthy, settings rolled back.

One JSON file per unit under `<state dir>/history/`, written atomically, so a restarted
reconciler (or `tensorforge plan`, which only reads) sees what the last one knew. The plan
decides from it; drivers only record what they did."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.plan import Rejected, Trial

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
MAX_BACKOFF_SECONDS = 30.0
# Settings rolled back are not tried again before this.
ROLLBACK_BACKOFF_SECONDS = 300.0


def backoff(failures: int) -> float:
    """Seconds before the next start after `failures` failed ones: 1, 2, 4, … at most
    MAX_BACKOFF_SECONDS (the exponent is capped: 2.0**1024 does not fit a float)."""
    return min(0.5 * 2.0 ** min(failures, 32), MAX_BACKOFF_SECONDS)


@dataclass
class UnitHistory:
    failures: int = 0
    retry_at: float = 0.0
    trial_since: float | None = None
    trial_previous: str | None = None
    rejected: str | None = None
    rejected_until: float = 0.0
    rejected_reason: str = ""
    answered: bool = False  # its probe got an answer since it was (re)started
    silent_since: float | None = None  # no answer since then, having answered (liveness)

    @property
    def trial(self) -> Trial | None:
        return None if self.trial_since is None else Trial(self.trial_since, self.trial_previous)

    @property
    def rejection(self) -> Rejected | None:
        if self.rejected is None:
            return None
        return Rejected(self.rejected, self.rejected_until, self.rejected_reason)


class HistoryStore:
    def __init__(self, state_dir: Path):
        self.directory = state_dir / HISTORY_DIR  # created by the first write, not before
        sweep_orphans(self.directory)  # left by a reconciler killed mid-write

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self, name: str) -> UnitHistory:
        try:
            data = json.loads(self._path(name).read_text(encoding="utf-8"))
            known = {f.name for f in fields(UnitHistory)}
            return UnitHistory(**{k: v for k, v in data.items() if k in known})
        except FileNotFoundError:
            return UnitHistory()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable unit history %s: %s", self._path(name), exc)
            return UnitHistory()

    def save(self, name: str, history: UnitHistory) -> None:
        write_atomic(self._path(name), json.dumps(asdict(history), indent=1))

    def forget(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    # -- what drivers record ---------------------------------------------------------------
    def started(self, name: str, previous: str | None, now: float) -> None:
        """A (re)start: on trial until healthy. An open trial keeps its start and what ran
        before it (a crash loop of new settings is still the same change)."""
        h = self.load(name)
        if h.trial_since is None:
            h.trial_since, h.trial_previous = now, previous
        h.answered, h.silent_since = False, None  # a new process answers afresh
        self.save(name, h)

    def healthy(self, name: str) -> None:
        h = self.load(name)
        if h.failures or h.retry_at or h.trial_since is not None:
            h.failures, h.retry_at, h.trial_since, h.trial_previous = 0, 0.0, None, None
            self.save(name, h)

    def failed(self, name: str, now: float, end_trial: bool = False) -> UnitHistory:
        """A failed start (an exit, a launch error): backed off. A trial stays open (a crash
        loop of new settings is rolled back once its time is up) unless `end_trial` (the
        plan's FAIL: no health in time and nothing to roll back to)."""
        h = self.load(name)
        h.failures += 1
        h.retry_at = now + backoff(h.failures)
        if end_trial:
            h.trial_since, h.trial_previous = None, None
        self.save(name, h)
        return h

    def rolled_back(self, name: str, content: str, reason: str, now: float) -> None:
        h = self.load(name)
        h.rejected, h.rejected_until, h.rejected_reason = (
            content,
            now + ROLLBACK_BACKOFF_SECONDS,
            reason,
        )
        h.trial_since, h.trial_previous = None, None
        h.answered, h.silent_since = False, None
        self.save(name, h)

    # -- liveness: written only when it changes, so `plan` in another process sees it too ---
    def probed(self, name: str, answered: bool, now: float) -> UnitHistory:
        h = self.load(name)
        if answered and (not h.answered or h.silent_since is not None):
            h.answered, h.silent_since = True, None
            self.save(name, h)
        elif not answered and h.answered and h.silent_since is None:
            h.silent_since = now
            self.save(name, h)
        return h
