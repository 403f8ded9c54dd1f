"""The process driver: for hosts without systemd, each unit is a child process.

What runs is recorded in the state directory (one JSON file per unit: pid, process start time,
launch description), so any process can observe it, and a supervisor that was killed adopts
its children again when it comes back instead of starting duplicates."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from reconciler.backends.commands import Launch
from reconciler.backends.registry import kind_of
from reconciler.config.schema import BackendSpec, GatewaySpec
from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.drivers.history import HistoryStore, UnitHistory, backoff
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit, Stopping

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 15.0
KILL_SETTLE_SECONDS = 5.0  # at most, for a SIGKILLed group to be gone before halt returns
# Leftovers of a leader that died: already orphaned, so a short grace before SIGKILL.
LEFTOVER_GRACE_SECONDS = 3.0
# Every unit's process carries this variable (units dir, name, content hash), so a process
# whose pid was never recorded can still be recognised as ours.
UNIT_ENV = "TENSORFORGE_UNIT"


@dataclass
class UnitRecord:
    name: str
    content: str
    pid: int | None = None  # the leader; it leads the unit's own process group
    start_ticks: int | None = None  # /proc/PID/stat field 22: tells a reused pid apart
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    log_file: str = ""
    error: str | None = None  # why the last start could not run at all
    stop_since: float | None = None  # a stop asked for (SIGTERM sent) and not yet done
    kill_at: float | None = None  # when the plan escalates that stop to SIGKILL
    gpus: list[int] = field(default_factory=list)  # the GPUs it was started on


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited; it only waits to be reaped
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_ticks: int | None) -> bool:
    return pid is not None and start_ticks is not None and _start_ticks(pid) == start_ticks


def visible_gpus(env: Mapping[str, str]) -> list[int]:
    """The GPUs an environment gives a process (CUDA_VISIBLE_DEVICES)."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    return [int(i) for i in visible.split(",") if i.strip().isdigit()]


class ProcessDriver:
    name = "process"
    outlives_supervisor = False  # its units are the supervisor's children: stopped with it

    def __init__(self, state_dir: Path):
        # Directories appear with the first unit started: `plan` creates nothing.
        self.state_dir = state_dir
        self.units_dir = state_dir / "units"
        self.logs_dir = state_dir / "logs"
        self.history = HistoryStore(state_dir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        for orphan in sweep_orphans(self.units_dir):
            log.info("removed %s, left by a writer that died mid-write", orphan)

    # -- what a unit's content is ----------------------------------------------------------
    def backend_content(
        self, unit: str, backend: BackendSpec, ref: str, launch: Launch, gpu_ids: list[int]
    ) -> str:
        env = dict(launch.env)
        models_dir = kind_of(backend.kind).models_dir_env
        if models_dir:  # a server that downloads models itself (Ollama) gets a directory
            env.setdefault(models_dir, str(self.state_dir / backend.kind))
        return json.dumps({"argv": launch.argv, "env": env}, indent=1, sort_keys=True) + "\n"

    def gateway_content(
        self, argv: list[str], gateway: GatewaySpec, config: str | None, env: dict[str, str]
    ) -> str:
        # The gateway restarts when its part of the desired state changes.
        spec = gateway.model_dump(mode="json")
        return (
            json.dumps({"argv": argv, "env": {}, "gateway": spec}, indent=1, sort_keys=True) + "\n"
        )

    # -- records -------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.units_dir / f"{name}.json"

    def load(self, name: str) -> UnitRecord | None:
        known = {f.name for f in fields(UnitRecord)}
        try:
            data = json.loads(self._path(name).read_text())
            # Records of older releases held backoff too (now in the unit's history).
            return UnitRecord(**{k: v for k, v in data.items() if k in known})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable unit record %s: %s", self._path(name), exc)
            return None

    def _save(self, record: UnitRecord) -> None:
        write_atomic(self._path(record.name), json.dumps(asdict(record), indent=1))

    def records(self) -> list[UnitRecord]:
        if not self.units_dir.is_dir():
            return []
        found = (self.load(p.stem) for p in sorted(self.units_dir.glob("*.json")))
        return [r for r in found if r is not None]

    # -- observe -------------------------------------------------------------------------
    def _reap(self) -> None:
        for name, child in list(self._children.items()):
            code = child.poll()
            if code is not None:
                del self._children[name]
                record = self.load(name)
                if record and record.pid == child.pid:
                    self._settle(record, code)

    def _settle(self, record: UnitRecord, code: int | None = None) -> UnitRecord:
        """Bring a record up to date with its processes, without waiting: a stop under way is
        done once the whole process group has exited; a leader that exited unasked is a failed
        start, and what it left running (vLLM's engine processes hold memory, GPUs and ports
        the next start needs) is asked to stop like any unit."""
        if record.pid is None:
            return record
        if record.stop_since is not None:
            _reap_pid(record.pid)
            if group_alive(record.pid):
                return record  # still stopping: the plan waits for it, or kills it
            record.pid = record.start_ticks = record.stop_since = record.kill_at = None
            record.last_exit = code if code is not None else record.last_exit
            self._save(record)
            return record
        if process_alive(record.pid, record.start_ticks):
            return record
        record.last_exit = code
        failures = self.history.failed(record.name, time.time()).failures
        log.warning("unit %s exited with %s (failure %d)", record.name, code, failures)
        if group_alive(record.pid):
            log.warning("unit %s: leader %d is gone, stopping the rest", record.name, record.pid)
            self._ask_to_stop(record, LEFTOVER_GRACE_SECONDS)
        else:
            record.pid = record.start_ticks = None
            self._save(record)
        return record

    def _foreseen(self, record: UnitRecord) -> tuple[UnitRecord, UnitHistory]:
        """What `_settle` would record, without writing or signalling anything (for `plan`)."""
        history = self.history.load(record.name)
        if record.pid is None:
            return record, history
        pid = record.pid
        if record.stop_since is not None:
            if not group_alive(pid):
                record = replace(record, pid=None, start_ticks=None, stop_since=None, kill_at=None)
            return record, history
        if process_alive(record.pid, record.start_ticks):
            return record, history
        now = time.time()
        failures = history.failures + 1
        history = replace(history, failures=failures, retry_at=now + backoff(failures))
        if group_alive(pid):
            return replace(record, stop_since=now, kill_at=now + LEFTOVER_GRACE_SECONDS), history
        return replace(record, pid=None, start_ticks=None), history

    def observe(self, record: bool = True) -> dict[str, ObservedUnit]:
        """What runs. `record`: write what was found (an exit, a stop done) and act on it (a
        dead leader's leftovers are asked to stop); False (`plan`): the same answer, nothing
        written."""
        if record:
            self._reap()
        observed = {}
        for found in self.records():
            if record:
                unit = self._settle(found)
                history = self.history.load(unit.name)
            else:
                unit, history = self._foreseen(found)
            stopping = None
            if unit.stop_since is not None:
                stopping = Stopping(unit.stop_since, unit.kill_at)
            # Settled, a record keeps its pid only while something of it runs. Asking /proc
            # again could see the leader just died and call the unit inactive while its
            # workers still run, and the plan would start another beside them.
            active = unit.pid is not None
            observed[unit.name] = ObservedUnit(
                name=unit.name,
                content=unit.content,
                active=active,
                failures=history.failures,
                retry_at=history.retry_at,
                gpus=tuple(unit.gpus) if active else (),
                trial=history.trial,
                rejected=history.rejection,
                stopping=stopping,
            )
        return observed

    # -- act -----------------------------------------------------------------------------
    def _marker(self, name: str) -> str:
        return f"{self.units_dir.resolve()}/{name}"

    def find_orphan(self, name: str) -> tuple[int, int, str] | None:
        """A process of this unit that no record knows: a supervisor killed between starting
        it and recording its pid leaves one. Returns (pid, start ticks, content hash)."""
        needle = f"{UNIT_ENV}={self._marker(name)}@".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            for entry in environ.split(b"\0"):
                if entry.startswith(needle):
                    pid = int(proc.name)
                    ticks = _start_ticks(pid)
                    if ticks is not None and os.getpgid(pid) == pid:  # the unit's leader
                        return pid, ticks, entry[len(needle) :].decode()
        return None

    # -- act -----------------------------------------------------------------------------
    def execute(
        self,
        actions: Sequence[Action],
        desired: Mapping[str, DesiredUnit],
        done: Callable[[Action, str | None], None] = lambda _a, _e: None,
    ) -> None:
        """Carry out the plan's actions on units, in order, without waiting for any: a stop
        (or the stop of a restart) sends SIGTERM and returns; the next pass observes it
        stopping, then stopped (and the plan starts it again, or kills it past its grace).
        `done(action, error)` after each. Drains, pulls and waits are not the driver's."""
        for action in actions:
            name = action.unit
            if action.kind is ActionKind.START:
                self.start(name, _content(action, desired))
            elif action.kind in (ActionKind.RESTART, ActionKind.STOP):
                self.stop(name, forget=name not in desired)
            elif action.kind is ActionKind.KILL:
                self.kill(name)
            elif action.kind is ActionKind.ROLLBACK:
                self.rollback(name, action, desired[name].content)
            elif action.kind is ActionKind.FAIL:
                self.history.failed(name, time.time(), end_trial=True)
            else:
                continue
            record = self.load(name)
            done(action, record.error if record else None)

    def rollback(self, name: str, action: Action, rejected: str) -> None:
        """Back to what ran before the change on trial: recorded as what the unit runs, the
        new settings held off for a while; the running process is asked to stop, and the plan
        starts the previous settings once it has."""
        previous = action.content or self.history.load(name).trial_previous
        record = self.load(name)
        if previous is None or record is None:
            return
        self.history.rolled_back(name, rejected, action.reason, time.time())
        record.content = previous
        self._save(record)
        self.stop(name)
        log.warning("%s: rolling back to the previous launch description", name)

    def start(self, name: str, content: str) -> None:
        record = self.load(name)
        if record is not None and self._settle(record).stop_since is not None:
            log.warning("%s: still stopping; not started beside it", name)  # the plan waits
            return
        self.history.started(name, record.content if record else None, time.time())
        self._launch(name, content)

    def _launch(self, name: str, content: str) -> None:
        launch = json.loads(content)
        self.units_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        record = self.load(name) or UnitRecord(name=name, content=content)
        digest = hashlib.sha256(content.encode()).hexdigest()[:16]
        orphan = self.find_orphan(name)
        if orphan is not None:
            pid, ticks, orphan_digest = orphan
            record.pid, record.start_ticks, record.started_at = pid, ticks, time.time()
            if orphan_digest == digest:
                record.content = content
                self._save(record)
                log.info("adopted %s (pid %d), started by an earlier supervisor", name, pid)
            else:  # other settings: stopped first, observed like any stop; started after
                self._ask_to_stop(record, STOP_GRACE_SECONDS)
                log.info("%s: stopping pid %d, started with other settings", name, pid)
            return
        log_path = self.logs_dir / f"{name}.log"
        env = {**os.environ, **launch.get("env", {})}
        env[UNIT_ENV] = f"{self._marker(name)}@{digest}"
        with log_path.open("ab") as log_file:
            try:
                # A session of its own: a Ctrl-C at the terminal reaches the supervisor, which
                # stops children in order, instead of every child at once.
                child = subprocess.Popen(
                    launch["argv"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                # A missing or non-executable binary: a failed start of this unit, backed off
                # like a crash, not an error that ends the pass for every other unit.
                self._launch_failed(record, content, launch["argv"][0], exc)
                return
        self._children[name] = child
        record.error = None
        record.content = content
        record.pid = child.pid
        record.start_ticks = _start_ticks(child.pid)
        record.started_at = time.time()
        record.log_file = str(log_path)
        record.gpus = visible_gpus(launch.get("env", {}))
        if record.last_exit is not None or self.history.load(name).failures:
            record.restarts += 1
        self._save(record)
        log.info("started %s (pid %d)", name, child.pid)

    def _launch_failed(self, record: UnitRecord, content: str, binary: str, exc: OSError) -> None:
        record.content = content
        record.pid = record.start_ticks = None
        failures = self.history.failed(record.name, time.time()).failures
        record.error = f"cannot run {binary}: {exc.strerror or exc}"
        self._save(record)
        log.error("unit %s: %s (failure %d)", record.name, record.error, failures)

    def mark_healthy(self, name: str) -> None:
        self.history.healthy(name)

    def _ask_to_stop(self, record: UnitRecord, grace: float) -> None:
        """SIGTERM the unit's process group and record when the plan may SIGKILL it. Recorded
        first: the exit that follows was asked for, not a failure."""
        assert record.pid is not None
        now = time.time()
        record.stop_since, record.kill_at = now, now + grace
        self._save(record)
        try:
            os.killpg(record.pid, signal.SIGTERM)
            os.killpg(record.pid, signal.SIGCONT)  # a stopped (SIGSTOP) one acts once continued
        except ProcessLookupError:
            pass

    def stop(self, name: str, forget: bool = False) -> None:
        """Ask a running unit to stop and return (its exit is observed next pass). A unit
        that runs nothing and is `forget`: its record and history go."""
        record = self.load(name)
        if record is None:
            return
        record = self._settle(record)
        if record.pid is not None:
            if record.stop_since is None:
                self._ask_to_stop(record, STOP_GRACE_SECONDS)
                log.info("stopping %s (pid %d)", name, record.pid)
        elif forget:
            self._path(name).unlink(missing_ok=True)
            self.history.forget(name)

    def kill(self, name: str) -> None:
        """SIGKILL a stop that outlived its grace (the plan's KILL)."""
        record = self.load(name)
        if record is None or record.pid is None or record.stop_since is None:
            return
        log.warning("unit %s: group %d did not stop within its grace; killing it", name, record.pid)
        try:
            os.killpg(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap_pid(record.pid)

    def halt(self, name: str, forget: bool = False, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop a unit and wait for it (SIGKILL past `grace`): for shutting down, never in a
        pass."""
        record = self.load(name)
        if record is None:
            return
        record = self._settle(record)
        if record.pid is not None:
            if record.stop_since is None:
                self._ask_to_stop(record, grace)
            terminate(record.pid, max(0.0, (record.kill_at or 0.0) - time.time()))
            child = self._children.pop(name, None)
            if child is not None:
                child.wait()
            self._settle(self.load(name) or record)
        if forget:
            self._path(name).unlink(missing_ok=True)
            self.history.forget(name)


def _content(action: Action, desired: Mapping[str, DesiredUnit]) -> str:
    """What a START runs: the plan's choice (the declared settings, or those a rollback
    restored); actions built by hand name none, and run the declared ones."""
    return action.content if action.content is not None else desired[action.unit].content


def terminate(pid: int, grace: float) -> None:
    """SIGTERM the process group, wait up to `grace` seconds for all of it to exit (a server's
    workers too, not just the leader: they may hold the port or GPU memory), then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
        os.killpg(
            pid, signal.SIGCONT
        )  # a stopped (SIGSTOP, hung) process acts on it only once continued
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_pid(pid)
        if not group_alive(pid):
            return
        time.sleep(0.05)
    log.warning("process group %d did not stop within %.0fs; killing it", pid, grace)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # SIGKILL is delivered, not done: on a busy machine the group's processes take a moment to
    # exit, and whoever halts expects them gone (the port and memory free) on return.
    deadline = time.monotonic() + KILL_SETTLE_SECONDS
    while True:
        _reap_pid(pid)
        if not group_alive(pid) or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """True while a process of the group has not exited. Zombies do not count: the leader's
    orphaned children are reaped by init, which in a container may never do it."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _reap_pid(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
