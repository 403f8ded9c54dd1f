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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reconciler.drivers.atomic import sweep_orphans, write_atomic
from reconciler.plan import DesiredUnit, ObservedUnit

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 15.0
# Every unit's process carries this variable (units dir, name, content hash), so a process
# whose pid was never recorded can still be recognised as ours.
UNIT_ENV = "TENSORFORGE_UNIT"
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class UnitRecord:
    name: str
    content: str
    pid: int | None = None
    start_ticks: int | None = None  # /proc/PID/stat field 22: tells a reused pid apart
    started_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
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


def backoff(failures: int) -> float:
    """Seconds before the next start after `failures` failed ones: 1, 2, 4, … at most
    MAX_BACKOFF_SECONDS (the exponent is capped: 2.0**1024 does not fit a float)."""
    return min(0.5 * 2.0 ** min(failures, 32), MAX_BACKOFF_SECONDS)


class ProcessDriver:
    name = "process"

    def __init__(self, state_dir: Path):
        self.units_dir = state_dir / "units"
        self.logs_dir = state_dir / "logs"
        self.units_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        for orphan in sweep_orphans(self.units_dir):
            log.info("removed %s, left by a writer that died mid-write", orphan)

    # -- records -------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.units_dir / f"{name}.json"

    def load(self, name: str) -> UnitRecord | None:
        try:
            return UnitRecord(**json.loads(self._path(name).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable unit record %s: %s", self._path(name), exc)
            return None

    def _save(self, record: UnitRecord) -> None:
        write_atomic(self._path(record.name), json.dumps(asdict(record), indent=1))

    def records(self) -> list[UnitRecord]:
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
        record.last_exit = code
        record.pid = None
        record.start_ticks = None
        if record.extra.get("stopping"):
            record.extra.pop("stopping")
        else:
            record.failures += 1
            record.retry_at = time.time() + backoff(record.failures)
            log.warning("unit %s exited with %s (failure %d)", record.name, code, record.failures)
        self._save(record)

    def observe(self) -> dict[str, ObservedUnit]:
        self._reap()
        observed = {}
        for record in self.records():
            active = process_alive(record.pid, record.start_ticks)
            if not active and record.pid is not None:
                self._record_exit(record, None)  # died while nobody was watching
            observed[record.name] = ObservedUnit(
                name=record.name,
                content=record.content,
                active=active,
                failures=record.failures,
                retry_at=record.retry_at,
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

    def start(self, unit: DesiredUnit) -> None:
        launch = json.loads(unit.content)
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
        if record.last_exit is not None or record.failures:
            record.restarts += 1
        self._save(record)
        log.info("started %s (pid %d)", unit.name, child.pid)

    def _launch_failed(self, record: UnitRecord, content: str, binary: str, exc: OSError) -> None:
        record.content = content
        record.pid = record.start_ticks = None
        record.failures += 1
        record.retry_at = time.time() + backoff(record.failures)
        record.extra["error"] = f"cannot run {binary}: {exc.strerror or exc}"
        self._save(record)
        log.error("unit %s: %s (failure %d)", record.name, record.extra["error"], record.failures)

    def mark_healthy(self, name: str) -> None:
        record = self.load(name)
        if record and record.failures:
            record.failures = 0
            record.retry_at = 0.0
            self._save(record)

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

    def restart(self, unit: DesiredUnit) -> None:
        self.stop(unit.name)
        self.start(unit)

    def remove(self, name: str) -> None:
        self.stop(name, forget=True)


def terminate(pid: int, start_ticks: int | None, grace: float) -> None:
    """SIGTERM the process group, wait up to `grace` seconds for all of it to exit (a server's
    workers too, not just the leader: they may hold the port or GPU memory), then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
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
