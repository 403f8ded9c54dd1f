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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from reconciler.backends.registry import kind_of
from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.drivers.history import HistoryStore
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 15.0
# Leftovers of a leader that died: already orphaned, so a short grace before SIGKILL.
LEFTOVER_GRACE_SECONDS = 3.0
# Every unit's process carries this variable (units dir, name, content hash), so a process
# whose pid was never recorded can still be recognised as ours.
UNIT_ENV = "TENSORFORGE_UNIT"


@dataclass
class UnitRecord:
    name: str
    content: str
    pid: int | None = None
    start_ticks: int | None = None  # /proc/PID/stat field 22: tells a reused pid apart
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    log_file: str = ""
    extra: dict = field(default_factory=dict)


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


def launch_gpus(content: str | None) -> tuple[int, ...]:
    """The GPUs a launch description gives its process (CUDA_VISIBLE_DEVICES)."""
    try:
        visible = json.loads(content or "{}").get("env", {}).get("CUDA_VISIBLE_DEVICES", "")
    except (ValueError, AttributeError):
        return ()
    return tuple(int(i) for i in visible.split(",") if i.strip().isdigit())


class ProcessDriver:
    name = "process"
    outlives_supervisor = False  # its units are the supervisor's children: stopped with it

    def __init__(self, state_dir: Path):
        # Directories appear with the first unit started: `plan` creates nothing.
        self.state_dir = state_dir
        self.units_dir = state_dir / "units"
        self.logs_dir = state_dir / "logs"
        self.history = HistoryStore(state_dir)
        self._children: dict[str, subprocess.Popen] = {}
        for orphan in sweep_orphans(self.units_dir):
            log.info("removed %s, left by a writer that died mid-write", orphan)

    # -- what a unit's content is ----------------------------------------------------------
    def backend_content(self, unit: str, backend, ref: str, launch, gpu_ids: list[int]) -> str:
        env = dict(launch.env)
        models_dir = kind_of(backend.kind).models_dir_env
        if models_dir:  # a server that downloads models itself (Ollama) gets a directory
            env.setdefault(models_dir, str(self.state_dir / backend.kind))
        return json.dumps({"argv": launch.argv, "env": env}, indent=1, sort_keys=True) + "\n"

    def gateway_content(self, argv: list[str], gateway, config: str | None, env: dict[str, str]) -> str:
        # The gateway restarts when its part of the desired state changes.
        spec = gateway.model_dump(mode="json")
        return json.dumps({"argv": argv, "env": {}, "gateway": spec}, indent=1, sort_keys=True) + "\n"

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
                    self._record_exit(record, code)

    def _record_exit(self, record: UnitRecord, code: int | None) -> None:
        if record.pid is not None and group_alive(record.pid):
            # The leader died (SIGKILL, a crash) but its workers did not (vLLM's engine
            # processes): they hold memory, GPUs and ports the next start needs.
            log.warning("unit %s: leader %d is gone, ending its leftover processes", record.name, record.pid)
            terminate(record.pid, None, grace=LEFTOVER_GRACE_SECONDS)
        record.last_exit = code
        record.pid = None
        record.start_ticks = None
        if record.extra.get("stopping"):
            record.extra.pop("stopping")
        else:
            failures = self.history.failed(record.name, time.time()).failures
            log.warning("unit %s exited with %s (failure %d)", record.name, code, failures)
        self._save(record)

    def observe(self) -> dict[str, ObservedUnit]:
        self._reap()
        observed = {}
        for record in self.records():
            active = process_alive(record.pid, record.start_ticks)
            if not active and record.pid is not None:
                self._record_exit(record, None)  # died while nobody was watching
            history = self.history.load(record.name)
            observed[record.name] = ObservedUnit(
                name=record.name,
                content=record.content,
                active=active,
                failures=history.failures,
                retry_at=history.retry_at,
                gpus=launch_gpus(record.content) if active else (),
                trial=history.trial,
                rejected=history.rejection,
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
        """Carry out the plan's actions on units, in order; `done(action, error)` after each
        (the controller ends drains there). Drains, pulls and waits are not the driver's."""
        for action in actions:
            name = action.unit
            if action.kind is ActionKind.START:
                self.start(desired[name])
            elif action.kind is ActionKind.RESTART:
                self.restart(desired[name])
            elif action.kind is ActionKind.STOP:
                self.stop(name, forget=name not in desired)
            elif action.kind is ActionKind.ROLLBACK:
                self.rollback(desired[name], action.reason)
            elif action.kind is ActionKind.FAIL:
                self.history.failed(name, time.time(), end_trial=True)
            else:
                continue
            record = self.load(name)
            done(action, record.extra.get("error") if record else None)

    def rollback(self, unit: DesiredUnit, reason: str) -> None:
        """Run what ran before the change on trial; its settings wait out a backoff."""
        previous = self.history.load(unit.name).trial_previous
        if previous is None:
            return
        self.history.rolled_back(unit.name, unit.content, reason, time.time())
        self.stop(unit.name)
        self._launch(DesiredUnit(unit.name, previous))
        log.warning("%s: restored the previous launch description and started it", unit.name)

    def start(self, unit: DesiredUnit) -> None:
        record = self.load(unit.name)
        self.history.started(unit.name, record.content if record else None, time.time())
        self._launch(unit)

    def _launch(self, unit: DesiredUnit) -> None:
        launch = json.loads(unit.content)
        self.units_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        record = self.load(unit.name) or UnitRecord(name=unit.name, content=unit.content)
        digest = hashlib.sha256(unit.content.encode()).hexdigest()[:16]
        orphan = self.find_orphan(unit.name)
        if orphan is not None:
            pid, ticks, orphan_digest = orphan
            if orphan_digest == digest:
                record.content, record.pid, record.start_ticks = unit.content, pid, ticks
                record.started_at = time.time()
                self._save(record)
                log.info("adopted %s (pid %d), started by an earlier supervisor", unit.name, pid)
                return
            terminate(pid, ticks, STOP_GRACE_SECONDS)
        log_path = self.logs_dir / f"{unit.name}.log"
        env = {**os.environ, **launch.get("env", {})}
        env[UNIT_ENV] = f"{self._marker(unit.name)}@{digest}"
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
                self._launch_failed(record, unit.content, launch["argv"][0], exc)
                return
        self._children[unit.name] = child
        record.extra.pop("error", None)
        record.content = unit.content
        record.pid = child.pid
        record.start_ticks = _start_ticks(child.pid)
        record.started_at = time.time()
        record.log_file = str(log_path)
        if record.last_exit is not None or self.history.load(unit.name).failures:
            record.restarts += 1
        self._save(record)
        log.info("started %s (pid %d)", unit.name, child.pid)

    def _launch_failed(self, record: UnitRecord, content: str, binary: str, exc: OSError) -> None:
        record.content = content
        record.pid = record.start_ticks = None
        failures = self.history.failed(record.name, time.time()).failures
        record.extra["error"] = f"cannot run {binary}: {exc.strerror or exc}"
        self._save(record)
        log.error("unit %s: %s (failure %d)", record.name, record.extra["error"], failures)

    def mark_healthy(self, name: str) -> None:
        self.history.healthy(name)

    def stop(self, name: str, forget: bool = False, grace: float = STOP_GRACE_SECONDS) -> None:
        record = self.load(name)
        if record is None:
            return
        if process_alive(record.pid, record.start_ticks):
            record.extra["stopping"] = True
            self._save(record)
            terminate(record.pid, record.start_ticks, grace)  # type: ignore[arg-type]
            child = self._children.pop(name, None)
            if child is not None:
                child.wait()
            record = self.load(name) or record
            record.pid = record.start_ticks = None
            record.extra.pop("stopping", None)
            self._save(record)
        if forget:
            self._path(name).unlink(missing_ok=True)
            self.history.forget(name)

    def restart(self, unit: DesiredUnit) -> None:
        record = self.load(unit.name)
        self.history.started(unit.name, record.content if record else None, time.time())
        self.stop(unit.name)
        self._launch(unit)

    def remove(self, name: str) -> None:
        self.stop(name, forget=True)


def terminate(pid: int, start_ticks: int | None, grace: float) -> None:
    """SIGTERM the process group, wait up to `grace` seconds for all of it to exit (a server's
    workers too, not just the leader: they may hold the port or GPU memory), then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)  # a stopped (SIGSTOP, hung) process acts on it only once continued
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
    _reap_pid(pid)


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
