"""The systemd driver: each unit is a `tensorforge-NAME.service` file in the unit directory.

Observe reads the unit files (their text is the installed "content" the plan compares) and asks
systemd for their state. A pass writes every changed file atomically, reloads systemd once,
starts/restarts/stops in plan order and waits for health; a changed unit that does not become
healthy in time gets its previous file back and is restarted with it.

A file written is not yet a change made: if the reload or restart fails, or the reconciler is
killed in between, the old process runs on while the file says the new settings. So a pending
mark (in the state directory) is written before a unit's file and removed once its start or
restart succeeded; observe reports a marked unit as changed, and the next pass finishes it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from reconciler.backends.health import BackendHealth, Health
from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.paths import state_dir as default_state_dir
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit
from reconciler.units.render import MANAGED_MARKER, UNIT_PREFIX, unit_file_name

log = logging.getLogger(__name__)

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
# Where units go instead, e.g. /run/systemd/system on NixOS, whose /etc/systemd/system is the
# read-only system closure (modules/tensorforge.nix sets it).
UNIT_DIR_ENV = "TF_UNIT_DIR"

ACTIVE_STATES = ("active", "activating", "reloading")
# A unit whose change was rolled back is not tried again with the same content before this.
ROLLBACK_BACKOFF_SECONDS = 300.0
# A unit that did not become healthy is started again after 10 s, 20 s, … at most this.
MAX_START_BACKOFF_SECONDS = 300.0
PENDING_DIR = "systemd-pending"
# Appended to the content observe reports for a unit with a pending mark: it then differs from
# any desired content, so the plan restarts the unit whatever the file holds.
PENDING_NOTE = "# tensorforge: written, but not yet (re)started by systemd\n"

Systemctl = Callable[[Sequence[str]], subprocess.CompletedProcess]


def default_unit_dir() -> Path:
    return Path(os.environ.get(UNIT_DIR_ENV) or DEFAULT_UNIT_DIR)


def run_systemctl(args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)


def systemd_booted() -> bool:
    """sd_booted(): systemd is PID 1 on this host (or container)."""
    return Path("/run/systemd/system").is_dir()


class SystemdError(RuntimeError):
    pass


@dataclass
class SystemdRecord:
    """What `status` shows for one unit (the process driver's UnitRecord, as systemd sees it)."""

    name: str
    content: str
    pid: int | None = None
    restarts: int = 0
    active_state: str = "unknown"
    sub_state: str = ""
    result: str = ""


@dataclass(frozen=True)
class ApplyFailure:
    unit: str
    reason: str
    rolled_back: bool


def _managed(path: Path) -> tuple[str, str] | None:
    """(unit name, file text) of a unit file this reconciler wrote, else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    first = text.split("\n", 1)[0]
    if not first.startswith(MANAGED_MARKER):
        return None
    name = first.removeprefix(MANAGED_MARKER).strip()
    if name == "reconciler" or path.name != unit_file_name(name):
        return None  # the reconciler's own unit is never planned against
    return name, text


class SystemdDriver:
    name = "systemd"

    def __init__(
        self,
        unit_dir: Path | None = None,
        systemctl: Systemctl = run_systemctl,
        poll_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        state_dir: Path | None = None,
    ):
        self.unit_dir = Path(unit_dir) if unit_dir is not None else default_unit_dir()
        self.pending_dir = (state_dir or default_state_dir()) / PENDING_DIR
        self.systemctl = systemctl
        self.poll_interval = poll_interval
        self.clock = clock
        self.sleep = sleep
        self.failures: list[ApplyFailure] = []
        self._rejected: dict[str, tuple[str, float]] = {}  # unit -> (content, retry after)
        self._start_failures: dict[str, tuple[int, float]] = {}  # unit -> (count, retry after)
        self._reachable = True

    def backing_off(self, unit: str, content: str, now: float | None = None) -> bool:
        """True while this exact unit content, rolled back recently, waits before a retry."""
        rejected = self._rejected.get(unit)
        return bool(rejected and rejected[0] == content and rejected[1] > (time.time() if now is None else now))

    # -- files ---------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.unit_dir / unit_file_name(name)

    def installed(self) -> dict[str, str]:
        """Unit name -> file text, for the units this reconciler manages (by its marker)."""
        found: dict[str, str] = {}
        if not self.unit_dir.is_dir():
            return found
        sweep_orphans(self.unit_dir, prefix=UNIT_PREFIX)
        for path in sorted(self.unit_dir.glob(f"{UNIT_PREFIX}*.service")):
            managed = _managed(path)
            if managed is not None:
                found[managed[0]] = managed[1]
        return found

    def _write(self, name: str, content: str) -> None:
        write_atomic(self.path(name), content, mode=0o644)

    # -- pending marks -------------------------------------------------------------------
    def pending(self) -> dict[str, str | None]:
        """Units whose file was written but not (re)started since -> the file text before that
        change (None: there was no file), which may be what still runs."""
        found: dict[str, str | None] = {}
        if not self.pending_dir.is_dir():
            return found
        sweep_orphans(self.pending_dir)
        for path in sorted(self.pending_dir.iterdir()):
            if path.name.startswith("."):
                continue  # a live writer's temporary file
            try:
                found[path.name] = json.loads(path.read_text(encoding="utf-8"))["before"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("unreadable pending mark %s (%s); restarting %s", path, exc, path.name)
                found[path.name] = None
        return found

    def _begin(self, name: str, before: str | None) -> None:
        """Mark `name` pending before its file is written. An existing mark is kept: it holds
        what ran before the first change that was cut short."""
        mark = self.pending_dir / name
        if not mark.exists():
            write_atomic(mark, json.dumps({"before": before}))

    def _done(self, name: str) -> None:
        (self.pending_dir / name).unlink(missing_ok=True)

    # -- systemctl -----------------------------------------------------------------------
    def _call(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = self.systemctl(list(args))
        if check and result.returncode != 0:
            raise SystemdError(
                f"systemctl {' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[:300]}"
            )
        return result

    def show(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        """`systemctl show` properties per unit name; empty if systemd cannot be asked."""
        if not names:
            return {}
        props = "Id,ActiveState,SubState,Result,MainPID,NRestarts"
        try:
            result = self._call("show", "-p", props, *(unit_file_name(n) for n in names), check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            result = subprocess.CompletedProcess([], 1, "", str(exc))
        if result.returncode != 0:
            if self._reachable:
                log.info("systemd not reachable (%s); treating installed units as running",
                         (result.stderr or "").strip()[:200])
            self._reachable = False
            return {}
        self._reachable = True
        by_id: dict[str, dict[str, str]] = {}
        for block in result.stdout.strip().split("\n\n"):
            values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "Id" in values:
                by_id[values["Id"]] = values
        return {n: by_id.get(unit_file_name(n), {}) for n in names}

    # -- observe -------------------------------------------------------------------------
    def records(self) -> list[SystemdRecord]:
        files = self.installed()
        states = self.show(list(files))
        records = []
        for name, text in files.items():
            state = states.get(name, {})
            pid = int(state.get("MainPID", "0") or 0)
            records.append(
                SystemdRecord(
                    name=name,
                    content=text,
                    pid=pid or None,
                    restarts=int(state.get("NRestarts", "0") or 0),
                    active_state=state.get("ActiveState", "unknown"),
                    sub_state=state.get("SubState", ""),
                    result=state.get("Result", ""),
                )
            )
        return records

    def observe(self) -> dict[str, ObservedUnit]:
        observed = {}
        pending = self.pending()
        for record in self.records():
            # Without systemd (plan against a unit directory) the files are all there is.
            active = record.active_state in ACTIVE_STATES or not self._reachable
            rejected = self._rejected.get(record.name)
            failed, retry_at = self._start_failures.get(record.name, (0, 0.0))
            if rejected:
                retry_at = max(retry_at, rejected[1])
            content = record.content
            if record.name in pending:
                content = (pending[record.name] or "") + PENDING_NOTE
            observed[record.name] = ObservedUnit(
                name=record.name,
                content=content,
                active=active,
                failures=failed,
                retry_at=retry_at if not active else 0.0,
            )
        return observed

    def mark_healthy(self, name: str) -> None:
        self._start_failures.pop(name, None)

    # -- act, one unit at a time (the ProcessDriver interface) ---------------------------
    def start(self, unit: DesiredUnit, verb: str = "start") -> None:
        before = _managed(self.path(unit.name)) if self.path(unit.name).exists() else None
        self._begin(unit.name, before[1] if before else None)
        self._write(unit.name, unit.content)
        self._call("daemon-reload")
        self._call(verb, unit_file_name(unit.name))
        self._done(unit.name)

    def restart(self, unit: DesiredUnit) -> None:
        self.start(unit, "restart")

    def stop(self, name: str, forget: bool = False, grace: float = 0.0) -> None:
        self._call("stop", unit_file_name(name), check=False)
        if forget:
            self.path(name).unlink(missing_ok=True)
            self._done(name)
            self._call("reset-failed", unit_file_name(name), check=False)
            self._call("daemon-reload")

    def remove(self, name: str) -> None:
        self.stop(name, forget=True)

    # -- act, a whole pass ---------------------------------------------------------------
    def apply(
        self,
        actions: Sequence[Action],
        desired: Mapping[str, DesiredUnit],
        health: Callable[[str], BackendHealth],
        timeouts: Mapping[str, float],
        ready: Callable[[str], bool] = lambda _unit: True,
        drain: Callable[[str], AbstractContextManager] = lambda _unit: nullcontext(),
    ) -> list[ApplyFailure]:
        """Carry out one plan: write, one daemon-reload, act in plan order, wait, roll back.

        `ready(unit)` is asked before a unit is written (the controller pulls its model there);
        `health(unit)` probes a running unit; `timeouts` bounds the wait per unit; `drain(unit)`
        holds a running unit out of the gateway's routing while it is stopped or restarted."""
        self.failures = []
        previous = self.installed()
        pending = self.pending()
        for name, before in pending.items():  # a change cut short: roll back to what ran before it
            if before is None:
                previous.pop(name, None)
            else:
                previous[name] = before
        todo: list[Action] = []
        changed_files = False
        now = time.time()
        for action in actions:
            if action.kind not in (ActionKind.START, ActionKind.RESTART, ActionKind.STOP):
                continue
            if action.kind is ActionKind.STOP:
                todo.append(action)
                continue
            unit = desired[action.unit]
            if self.backing_off(action.unit, unit.content, now):
                continue  # rolled back recently; `failures` said why, backoff before retrying
            if not ready(action.unit):
                continue
            if previous.get(action.unit) != unit.content or action.unit in pending:
                self._begin(action.unit, previous.get(action.unit))
                self._write(action.unit, unit.content)
                changed_files = True
            todo.append(action)
        for action in todo:  # files of forgotten units go before the one reload
            if action.kind is ActionKind.STOP and action.unit not in desired:
                with drain(action.unit):
                    self._call("stop", unit_file_name(action.unit), check=False)
                self.path(action.unit).unlink(missing_ok=True)
                self._done(action.unit)
                changed_files = True
        if changed_files:
            self._call("daemon-reload")

        started: list[str] = []
        for action in todo:
            unit_name = unit_file_name(action.unit)
            if action.kind is ActionKind.STOP:
                if action.unit in desired:
                    with drain(action.unit):
                        self._call("stop", unit_name, check=False)
                else:
                    self._call("reset-failed", unit_name, check=False)
                continue
            verb = "restart" if action.kind is ActionKind.RESTART else "start"
            # A unit that hit its start limit refuses to start until its counter is reset.
            self._call("reset-failed", unit_name, check=False)
            with drain(action.unit) if verb == "restart" else nullcontext():
                result = self._call(verb, unit_name, check=False)
            if result.returncode != 0:
                reason = f"systemctl {verb} failed: {(result.stderr or '').strip()[:200]}"
                self._fail(action.unit, reason, previous, desired)
                continue
            self._done(action.unit)  # systemd runs what the file says now
            started.append(action.unit)
        self._wait(started, health, timeouts, previous, desired)
        return self.failures

    def _wait(
        self,
        units: list[str],
        health: Callable[[str], BackendHealth],
        timeouts: Mapping[str, float],
        previous: Mapping[str, str],
        desired: Mapping[str, DesiredUnit],
    ) -> None:
        start = self.clock()
        pending = {u: BackendHealth(Health.DOWN, "not probed yet") for u in units}
        while pending:
            for unit in list(pending):
                state = health(unit)
                pending[unit] = state
                if state.ok:
                    del pending[unit]
                elif self.clock() - start >= timeouts.get(unit, 180.0):
                    del pending[unit]
                    self._fail(
                        unit,
                        f"not healthy within {timeouts.get(unit, 180.0):.0f}s "
                        f"({state.state.value}: {state.detail})",
                        previous,
                        desired,
                    )
            if pending:
                self.sleep(self.poll_interval)

    def _fail(
        self,
        unit: str,
        reason: str,
        previous: Mapping[str, str],
        desired: Mapping[str, DesiredUnit],
    ) -> None:
        old = previous.get(unit)
        new = desired[unit].content if unit in desired else None
        rolled_back = False
        if old is not None and new is not None and old != new:
            self._rejected[unit] = (new, time.time() + ROLLBACK_BACKOFF_SECONDS)
            try:
                self._begin(unit, old)
                self._write(unit, old)
                self._call("daemon-reload")
                self._call("reset-failed", unit_file_name(unit), check=False)
                self._call("restart", unit_file_name(unit))
                self._done(unit)
                rolled_back = True
                reason += "; restored the previous unit file and restarted it"
            except (SystemdError, OSError) as exc:
                reason += f"; restoring the previous unit file failed: {exc}"
        else:
            count = self._start_failures.get(unit, (0, 0.0))[0] + 1
            # The exponent is capped: 2.0**1024 does not fit a float.
            delay = min(10.0 * 2.0 ** min(count - 1, 32), MAX_START_BACKOFF_SECONDS)
            self._start_failures[unit] = (count, time.time() + delay)
        log.error("%s: %s", unit, reason)
        self.failures.append(ApplyFailure(unit, reason, rolled_back))


def unit_dir_writable(unit_dir: Path | None = None) -> bool:
    return os.access(unit_dir or default_unit_dir(), os.W_OK)
