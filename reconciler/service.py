"""The supervisor as a service: `up` in the foreground, `server start|stop|status` around a
background `up`. One supervisor per state directory, enforced with a lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from reconciler.config.schema import host_port
from reconciler.controller import Controller
from reconciler.drivers.process import _start_ticks, process_alive, terminate

log = logging.getLogger(__name__)

SUPERVISOR_FILE = "supervisor.json"


class AlreadyRunning(Exception):
    pass


def serve_foreground(controller: Controller) -> int:
    """Reconcile until SIGTERM or SIGINT, then stop everything we run."""
    lock_path = controller.state_dir / "supervisor.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AlreadyRunning(
            f"a supervisor already runs for {controller.state_dir}; "
            "use `tensorforge server stop` first or set TF_STATE_DIR"
        ) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: None)  # wakes the loop early; config is re-read
    _write_supervisor_record(controller.state_dir, controller.config)
    try:
        gateway = controller.desired.gateway
        backends = sum(1 for b in controller.desired.backends.values() if b.managed)
        if gateway.enable and controller.run_gateway:
            log.info(
                "supervising %d backend(s); gateway on http://%s",
                backends, host_port(gateway.host, gateway.port),
            )  # fmt: skip
        else:
            log.info("supervising %d backend(s); no gateway here", backends)
        controller.run(stop)
    finally:
        log.info("stopping everything this supervisor runs")
        controller.shutdown()
        (controller.state_dir / SUPERVISOR_FILE).unlink(missing_ok=True)
        lock.close()
    return 0


def _write_supervisor_record(state_dir: Path, config: str | None) -> None:
    record = {
        "pid": os.getpid(),
        "start_ticks": _start_ticks(os.getpid()),
        "config": config,
        "started_at": time.time(),
    }
    (state_dir / SUPERVISOR_FILE).write_text(json.dumps(record))


@dataclass
class SupervisorInfo:
    pid: int
    start_ticks: int | None
    config: str | None

    @property
    def alive(self) -> bool:
        return process_alive(self.pid, self.start_ticks)


def supervisor_info(state_dir: Path) -> SupervisorInfo | None:
    try:
        data = json.loads((state_dir / SUPERVISOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    info = SupervisorInfo(data["pid"], data.get("start_ticks"), data.get("config"))
    return info if info.alive else None


def start_background(
    config: str | None, state_dir: Path, log_level: str = "INFO"
) -> SupervisorInfo:
    """Start `tensorforge up` detached; returns once its supervisor record exists."""
    existing = supervisor_info(state_dir)
    if existing:
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "reconciler.cli", "--log-level", log_level, "up"]
    if config:
        argv += ["--config", str(Path(config).resolve())]
    env = {**os.environ, "TF_STATE_DIR": str(state_dir)}
    with (state_dir / "logs" / "supervisor.log").open("ab") as out:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = supervisor_info(state_dir)
        if info and info.pid == child.pid:
            return info
        if child.poll() is not None:
            tail = (state_dir / "logs" / "supervisor.log").read_text()[-2000:]
            raise RuntimeError(f"supervisor exited with {child.returncode}:\n{tail}")
        time.sleep(0.1)
    raise RuntimeError("supervisor did not start within 30s; see logs/supervisor.log")


def stop_background(state_dir: Path, grace: float = 60.0) -> bool:
    """Stop the background supervisor (which stops its units). True if one was running."""
    info = supervisor_info(state_dir)
    if info is None:
        _stop_orphans(state_dir)
        return False
    _end_supervisor(info, grace)
    if info.alive:
        raise RuntimeError(
            f"supervisor pid {info.pid} is still running after SIGKILL; not touching its units"
        )
    _stop_orphans(state_dir)  # whatever a killed supervisor left behind
    return True


def _end_supervisor(info: SupervisorInfo, grace: float) -> None:
    """SIGTERM the supervisor (it stops its units in order), SIGKILL it after `grace`. Its
    process group only when it leads one (`server start`); `tensorforge up` run from a shell
    script or `timeout` is in its parent's group, which must not be signalled."""
    try:
        leads_group = os.getpgid(info.pid) == info.pid
    except ProcessLookupError:
        return
    if leads_group:
        terminate(info.pid, grace)
        return
    try:
        os.kill(info.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while info.alive and time.monotonic() < deadline:
        time.sleep(0.1)
    if info.alive:
        log.warning("supervisor pid %d did not stop within %.0fs; killing it", info.pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while info.alive and time.monotonic() < deadline:
            time.sleep(0.05)


def _stop_orphans(state_dir: Path) -> None:
    from reconciler.drivers.process import ProcessDriver

    if not (state_dir / "units").is_dir():
        return
    driver = ProcessDriver(state_dir)
    for record in driver.records():
        driver.halt(record.name)


def wait_for_gateway(
    url: str,
    model: str | None,
    timeout: float,
    supervisor: SupervisorInfo | None,
    need_backend: bool = True,
) -> None:
    """Until the gateway answers /health with a healthy backend (for `model`, if given), or
    at all when `need_backend` is False."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if supervisor is not None and not supervisor.alive:
            raise RuntimeError("the supervisor exited while starting; see logs/supervisor.log")
        try:
            health = httpx.get(f"{url}/health", timeout=2).json()
            if not need_backend:
                return
            if "backends" not in health:
                last = "the gateway shows backend detail only to key holders and this host"
                time.sleep(0.25)
                continue
            wanted = [
                b for b in health["backends"].values() if model is None or b["model"] == model
            ]
            if any(b["healthy"] for b in wanted):
                return
            last = "; ".join(f"{b['model']}: {b['detail']}" for b in wanted) or "no backend"
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.25)
    raise TimeoutError(f"gateway at {url} not ready within {timeout:.0f}s ({last})")
