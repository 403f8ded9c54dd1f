"""The systemd driver: each unit is a `tensorforge-NAME.service` file in the unit directory.

Observe reads the unit files (their text is the installed "content" the plan compares) and asks
systemd for their state. A pass writes every changed file atomically, reloads systemd once,
and starts/restarts/stops/rolls back in plan order, each with `--no-block`: systemd queues the
job and the pass goes on. It never waits: the plan sees a unit stopping (a queued stop or
restart job, or `deactivating`) and waits for it next pass (systemd itself SIGKILLs past the
unit's TimeoutStopSec), a unit on trial until healthy, and rolls it back (an action like any
other) once its health_timeout has passed. Backoff and trials are the unit's history, as for
processes.

A file written is not yet a change made: if the reload or restart fails, or the reconciler is
killed in between, the old process runs on while the file says the new settings. So a pending
mark (in the state directory) is written before a unit's file and removed once its start or
restart succeeded; observe reports a marked unit as `pending`, and the next pass finishes it."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.backends.commands import Launch
from reconciler.config.schema import BackendSpec, GatewaySpec
from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.drivers.history import HistoryStore
from reconciler.paths import state_dir as default_state_dir
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit, Stopping
from reconciler.units.render import (
    MANAGED_MARKER,
    UNIT_PREFIX,
    backend_unit_spec,
    gateway_unit_spec,
    render_unit,
    unit_file_name,
)

log = logging.getLogger(__name__)

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
# Where units go instead, e.g. /run/systemd/system on NixOS, whose /etc/systemd/system is the
# read-only system closure (modules/tensorforge.nix sets it).
UNIT_DIR_ENV = "TF_UNIT_DIR"

ACTIVE_STATES = ("active", "activating", "reloading")
PENDING_DIR = "systemd-pending"
_VISIBLE = re.compile(r'(?:^|\s)"?CUDA_VISIBLE_DEVICES=([0-9,]*)')

Systemctl = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def default_unit_dir() -> Path:
    return Path(os.environ.get(UNIT_DIR_ENV) or DEFAULT_UNIT_DIR)


def run_systemctl(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
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
    job: bool = False  # systemd has a job queued or running for it (a start, stop, restart)
    gpus: tuple[int, ...] = ()  # CUDA_VISIBLE_DEVICES of the unit systemd has loaded


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
    outlives_supervisor = True  # systemd supervises the units: they run on without us

    def __init__(
        self,
        unit_dir: Path | None = None,
        systemctl: Systemctl = run_systemctl,
        state_dir: Path | None = None,
    ):
        self.unit_dir = Path(unit_dir) if unit_dir is not None else default_unit_dir()
        state = state_dir or default_state_dir()
        self.pending_dir = state / PENDING_DIR
        self.history = HistoryStore(state)
        self.systemctl = systemctl
        self._reachable = True

    # -- what a unit's content is ----------------------------------------------------------
    def backend_content(
        self, unit: str, backend: BackendSpec, ref: str, launch: Launch, gpu_ids: list[int]
    ) -> str:
        return render_unit(backend_unit_spec(unit, backend, backend.model, ref, launch, gpu_ids))

    def gateway_content(
        self, argv: list[str], gateway: GatewaySpec, config: str | None, env: dict[str, str]
    ) -> str:
        # The unit text holds argv; a config edit reaches the gateway through `up`.
        return render_unit(gateway_unit_spec("gateway", argv, gateway, config, env))

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
    def _call(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
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
        props = "Id,ActiveState,SubState,Result,MainPID,NRestarts,Job,Environment"
        try:
            result = self._call(
                "show", "-p", props, *(unit_file_name(n) for n in names), check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            result = subprocess.CompletedProcess([], 1, "", str(exc))
        if result.returncode != 0:
            if self._reachable:
                log.info(
                    "systemd not reachable (%s); treating installed units as running",
                    (result.stderr or "").strip()[:200],
                )
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
                    job=state.get("Job", "0") not in ("", "0"),
                    gpus=_visible_gpus(state.get("Environment", "")),
                )
            )
        return records

    def observe(self, record: bool = True) -> dict[str, ObservedUnit]:
        """What runs (`record` is the protocol's: systemd's state is read, never written)."""
        observed = {}
        pending = self.pending()
        for unit in self.records():
            # Without systemd (plan against a unit directory) the files are all there is.
            active = unit.active_state in ACTIVE_STATES or not self._reachable
            # A job on an `active` unit is a stop or a restart (a start would be done already);
            # on an `activating` one it is its start (or systemd's own auto-restart).
            stops = unit.active_state == "deactivating" or (
                unit.active_state == "active" and unit.job
            )
            starting = unit.job and not active  # queued: not to be started again
            history = self.history.load(unit.name)
            # A pending unit runs what its file held before the change (or nothing).
            content = pending.get(unit.name, unit.content) if unit.name in pending else unit.content
            observed[unit.name] = ObservedUnit(
                name=unit.name,
                content=content,
                active=active or starting,
                stopping=Stopping(0.0, None) if stops else None,  # systemd kills it in time
                failures=history.failures,
                retry_at=history.retry_at,
                pending=unit.name in pending,
                gpus=unit.gpus if active else (),
                trial=history.trial,
                rejected=history.rejection,
            )
        return observed

    def mark_healthy(self, name: str) -> None:
        self.history.healthy(name)

    # -- act: one pass of the plan -------------------------------------------------------
    def execute(
        self,
        actions: Sequence[Action],
        desired: Mapping[str, DesiredUnit],
        done: Callable[[Action, str | None], None] = lambda _a, _e: None,
    ) -> None:
        """Write every file the plan changes, reload systemd once, then act in plan order.
        `done(action, error)` after each action on a unit (the controller ends drains there)."""
        installed = self.installed()
        pending = self.pending()
        running = {**installed, **pending}  # what each unit runs now (None: nothing)
        states = self.show([a.unit for a in actions if a.kind is ActionKind.STOP])
        todo: list[Action] = []
        changed_files = False
        for action in actions:
            name = action.unit
            if action.kind in (ActionKind.START, ActionKind.RESTART, ActionKind.ROLLBACK):
                content = self._content(action, desired)
                if installed.get(name) != content or name in pending:
                    self._begin(name, running.get(name))
                    self._write(name, content)
                    changed_files = True
                todo.append(action)
            elif action.kind is ActionKind.STOP:
                state = states.get(name, {}).get("ActiveState", "inactive")
                if name not in desired and state in ("inactive", "failed"):
                    # Stopped and no longer declared: its file goes before the one reload.
                    # (A running one is asked to stop first; its file goes once it has.)
                    self.path(name).unlink(missing_ok=True)
                    self._done(name)
                    self.history.forget(name)
                    changed_files = True
                todo.append(action)
            elif action.kind is ActionKind.FAIL:
                self.history.failed(name, time.time(), end_trial=True)
                done(action, None)
        if changed_files:
            self._call("daemon-reload")
        for action in todo:
            done(action, self._act(action, desired, running))

    def _content(self, action: Action, desired: Mapping[str, DesiredUnit]) -> str:
        """The file a START, RESTART or ROLLBACK installs: the plan's choice (actions built by
        hand name none: the declared settings, or for a rollback what ran before)."""
        if action.content is not None:
            return action.content
        if action.kind is ActionKind.ROLLBACK:
            previous = self.history.load(action.unit).trial_previous
            if previous is not None:
                return previous
        return desired[action.unit].content

    def _act(
        self, action: Action, desired: Mapping[str, DesiredUnit], running: Mapping[str, str | None]
    ) -> str | None:
        name, unit_name = action.unit, unit_file_name(action.unit)
        if action.kind is ActionKind.STOP:
            if self.path(name).exists():
                self._call("stop", "--no-block", unit_name, check=False)
            else:
                self._call("reset-failed", unit_name, check=False)  # removed: forget its failures
            return None
        verb = "start" if action.kind is ActionKind.START else "restart"
        # A unit that hit its start limit refuses to start until its counter is reset.
        self._call("reset-failed", unit_name, check=False)
        result = self._call(verb, "--no-block", unit_name, check=False)
        now = time.time()
        if result.returncode != 0:
            reason = f"systemctl {verb} failed: {(result.stderr or '').strip()[:200]}"
            self._restore(name, running.get(name), self._content(action, desired), reason)
            return reason
        self._done(name)  # systemd runs what the file says now
        if action.kind is ActionKind.ROLLBACK:
            self.history.rolled_back(name, desired[name].content, action.reason, now)
            log.warning("%s: restored the previous unit file and restarted it", name)
        else:
            self.history.started(name, running.get(name), now)
        return None

    def _restore(self, name: str, old: str | None, new: str, reason: str) -> None:
        """systemctl refused the new file: put back what runs, and back off these settings."""
        if old is not None and old != new:
            self.history.rolled_back(name, new, reason, time.time())
            try:
                self._write(name, old)
                self._call("daemon-reload")
                self._done(name)
            except (SystemdError, OSError) as exc:
                log.error("%s: restoring the previous unit file failed: %s", name, exc)
        else:
            self.history.failed(name, time.time())
        log.error("%s: %s", name, reason)

    def halt(self, name: str, forget: bool = False) -> None:
        """`systemctl stop`, waiting for it: for shutting down, never in a pass."""
        self._call("stop", unit_file_name(name), check=False)
        if forget:
            self.path(name).unlink(missing_ok=True)
            self._done(name)
            self.history.forget(name)
            self._call("reset-failed", unit_file_name(name), check=False)
            self._call("daemon-reload")


def _visible_gpus(environment: str) -> tuple[int, ...]:
    """CUDA_VISIBLE_DEVICES from `systemctl show -p Environment` (its assignments, separated by
    spaces, quoted where systemd needs to): what the loaded unit runs with, not what a file
    says."""
    found = _VISIBLE.search(environment)
    return tuple(int(i) for i in found.group(1).split(",") if i) if found else ()


def unit_dir_writable(unit_dir: Path | None = None) -> bool:
    return os.access(unit_dir or default_unit_dir(), os.W_OK)
