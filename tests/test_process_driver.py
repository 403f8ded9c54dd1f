"""The process driver on real (tiny) processes: records survive the supervisor, a process
whose pid was never recorded is recognised and adopted, a stale one is replaced, and a stop
leaves no process of the unit's group behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import replace

import pytest

from reconciler.drivers.history import MAX_BACKOFF_SECONDS, UnitHistory, backoff
from reconciler.drivers.process import (
    UNIT_ENV,
    ProcessDriver,
    UnitRecord,
    _start_ticks,
    group_alive,
    process_alive,
)
from reconciler.plan import Action, ActionKind, DesiredUnit, ObservedUnit, plan


def sleeper(seconds: int = 60) -> DesiredUnit:
    content = json.dumps({"argv": ["sleep", str(seconds)], "env": {}}, indent=1) + "\n"
    return DesiredUnit("backend-x", content)


def stopped(driver: ProcessDriver, name: str = "backend-x") -> ObservedUnit:
    """Observe until its stop is done (a sleep exits on SIGTERM at once): passes, polled."""
    deadline = time.monotonic() + 10
    while (seen := driver.observe()[name]).stopping is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def test_start_stop_and_records(tmp_path):
    driver = ProcessDriver(tmp_path)
    driver.start("backend-x", sleeper().content)
    record = driver.load("backend-x")
    assert process_alive(record.pid, record.start_ticks)
    assert driver.observe()["backend-x"].active
    driver.stop("backend-x", forget=True)  # asked (SIGTERM), not waited for: kept until gone
    assert driver.load("backend-x").stop_since is not None
    assert not stopped(driver).active
    assert driver.history.load("backend-x").failures == 0  # an exit asked for is no failure
    driver.stop("backend-x", forget=True)  # stopped: now it is forgotten
    assert driver.observe() == {}


def test_an_unrecorded_process_of_the_unit_is_adopted_not_duplicated(tmp_path):
    driver = ProcessDriver(tmp_path)
    unit = sleeper()
    driver.start(unit.name, unit.content)
    first = driver.load("backend-x")
    # The supervisor died after starting the process but before recording it.
    (tmp_path / "units" / "backend-x.json").unlink()
    fresh = ProcessDriver(tmp_path)
    fresh.start(unit.name, unit.content)
    adopted = fresh.load("backend-x")
    try:
        assert adopted.pid == first.pid
    finally:
        fresh.halt("backend-x")
    assert not process_alive(first.pid, first.start_ticks)


def test_an_unrecorded_process_with_other_settings_is_stopped_then_replaced(tmp_path):
    driver = ProcessDriver(tmp_path)
    driver.start("backend-x", sleeper(60).content)
    old = driver.load("backend-x")
    (tmp_path / "units" / "backend-x.json").unlink()
    fresh = ProcessDriver(tmp_path)
    fresh.start("backend-x", sleeper(61).content)  # asks the stranger to stop, starts nothing
    asked = fresh.load("backend-x")
    assert asked.pid == old.pid and asked.stop_since is not None  # observed stopping until gone
    assert not stopped(fresh).active
    fresh.start("backend-x", sleeper(61).content)
    new = fresh.load("backend-x")
    try:
        assert new.pid != old.pid
        assert not process_alive(old.pid, old.start_ticks)
        environ = open(f"/proc/{new.pid}/environ", "rb").read().decode()
        assert f"{UNIT_ENV}=" in environ
    finally:
        fresh.halt("backend-x")


def test_a_process_from_another_state_dir_is_not_ours(tmp_path):
    other = subprocess.Popen(
        ["sleep", "60"], env={**os.environ, UNIT_ENV: f"{tmp_path}/elsewhere/units/backend-x@abc"},
        start_new_session=True,
    )  # fmt: skip
    try:
        assert ProcessDriver(tmp_path / "mine").find_orphan("backend-x") is None
    finally:
        other.kill()
        other.wait()


def group_members(pgid: int) -> list[str]:
    """`ps` lines of a process group's members, for a failure message."""
    listing = subprocess.run(
        ["ps", "-eo", "pid,pgid,stat,etime,args"], capture_output=True, text=True
    ).stdout.splitlines()
    return [line for line in listing[1:] if line.split()[1] == str(pgid)]


def start_server_with_worker(
    driver: ProcessDriver, directory, worker_prefix: str = "", leader_trap: str = ""
):
    """A unit whose leader starts a worker in its process group: (group id, worker pid)."""
    script = directory / "server.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"sh -c '{worker_prefix}echo $$ > worker.pid; while :; do sleep 0.1; done' &\n"
        f"{leader_trap}while :; do sleep 0.1; done\n"
    )
    script.chmod(0o755)
    content = json.dumps({"argv": ["sh", "-c", f"cd {directory} && exec {script}"], "env": {}})
    driver.start("backend-x", content)
    deadline = time.monotonic() + 10
    while not (directory / "worker.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return driver.load("backend-x").pid, int((directory / "worker.pid").read_text())


def test_a_stop_past_its_grace_is_killed_by_the_plan_with_the_whole_group(tmp_path):
    """A server whose worker ignores SIGTERM: the stop returns at once and is observed
    stopping, pass after pass, until its grace is over; then the plan says KILL, and the
    SIGKILL takes the whole group, so no worker keeps the port or the GPU memory."""
    driver = ProcessDriver(tmp_path)
    pgid, worker = start_server_with_worker(
        driver, tmp_path, 'trap "" TERM; ', "trap 'exit 0' TERM\n"
    )
    try:
        driver.stop("backend-x")
        seen = driver.observe()["backend-x"]
        assert seen.active and seen.stopping is not None and group_alive(pgid)
        [wait] = plan({}, {"backend-x": seen}, seen.stopping.kill_at - 1)
        assert wait.kind is ActionKind.WAIT and "killed in 1s" in wait.reason
        [kill] = plan({}, {"backend-x": seen}, seen.stopping.kill_at)
        assert kill.kind is ActionKind.KILL and "did not stop within its grace" in kill.reason
        driver.execute([kill], {})
        assert not stopped(driver).active
        assert not group_alive(pgid)
        assert not process_alive(worker, _start_ticks(worker))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def test_halt_waits_and_ends_the_whole_process_group(tmp_path):
    """Shutting down (not a pass) waits: past the grace the group is SIGKILLed."""
    driver = ProcessDriver(tmp_path)
    pgid, worker = start_server_with_worker(
        driver, tmp_path, 'trap "" TERM; ', "trap 'exit 0' TERM\n"
    )
    try:
        driver.halt("backend-x", grace=1.0)
        assert not group_alive(pgid)
        assert not process_alive(worker, _start_ticks(worker))
        assert not driver.observe()["backend-x"].active
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def test_a_killed_leaders_leftover_workers_are_ended_before_anything_else(tmp_path):
    """vLLM's engine processes outlive a SIGKILLed API server, holding GBs of memory: once
    the driver sees the leader gone, the rest of its process group goes too."""
    driver = ProcessDriver(tmp_path)
    pgid, worker = start_server_with_worker(driver, tmp_path)
    try:
        os.kill(pgid, signal.SIGKILL)  # the leader only
        # Pass by pass, as the loop does: seeing the leader gone asks the rest to stop
        # (SIGTERM), and past the short grace the plan's KILL (here driver.kill) ends it.
        # The first pass must already see the leftovers (never "nothing runs" while they do).
        began, passes, killed = time.monotonic(), [], 0
        while (seen := driver.observe()["backend-x"]).active and time.monotonic() < began + 90:
            passes.append((round(time.monotonic() - began, 2), seen.stopping))
            if seen.stopping is not None and time.time() >= seen.stopping.kill_at:
                driver.kill("backend-x")
                killed += 1
            time.sleep(0.05)
        seen = driver.observe()["backend-x"]
        assert not seen.active, (
            f"still active after {time.monotonic() - began:.1f}s and {len(passes)} passes "
            f"({killed} kills); first/last passes {passes[:2]} {passes[-2:]}; "
            f"group: {group_members(pgid)}"
        )
        assert not process_alive(worker, _start_ticks(worker))
        assert not group_alive(pgid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def test_a_leader_dying_while_observed_is_never_reported_as_nothing_running(tmp_path, monkeypatch):
    """One look at /proc per unit and pass: the leader that was alive when its record was
    settled and died a moment later was reported inactive by a second look, with its
    workers still running (a full CI run caught it), and the plan would have started another
    server beside them. The death is seen next pass, as a stop of what is left."""
    import reconciler.drivers.process as process

    driver = ProcessDriver(tmp_path)
    with subprocess.Popen(["sleep", "60"], start_new_session=True) as leader:
        try:
            driver.units_dir.mkdir()
            driver._save(UnitRecord(name="backend-x", content="{}", pid=leader.pid,
                                    start_ticks=_start_ticks(leader.pid)))  # fmt: skip
            looks = []

            def alive_then_dead(pid, ticks):  # the first look sees it, any later one does not
                looks.append(pid)
                return len(looks) == 1

            monkeypatch.setattr(process, "process_alive", alive_then_dead)
            assert driver.observe()["backend-x"].active
        finally:
            leader.kill()
            leader.wait()


def test_backoff_survives_thousands_of_failures(tmp_path):
    """2**1024 does not fit a float: without a cap on the exponent, observe raised
    OverflowError for a unit that had failed about a thousand times, every pass."""
    driver = ProcessDriver(tmp_path)
    driver.units_dir.mkdir()
    driver.history.save("backend-x", UnitHistory(failures=5000))
    driver._save(UnitRecord(name="backend-x", content="{}", pid=999999999, start_ticks=1))
    seen = driver.observe()["backend-x"]
    assert seen.failures == 5001 and seen.retry_at - time.time() <= MAX_BACKOFF_SECONDS
    assert backoff(5000) == MAX_BACKOFF_SECONDS


def test_a_rollback_runs_what_ran_before_and_holds_the_new_settings(tmp_path):
    """The same trial and rollback as under systemd, recorded in the same unit history, pass
    by pass through the plan: a restart stops, the next pass starts; a rollback stops the new
    settings and the next pass starts the previous ones, not the declared ones."""
    driver = ProcessDriver(tmp_path)
    old, new = sleeper(60), DesiredUnit("backend-x", sleeper(61).content, health_timeout=5)

    def one_pass(desired, now=None):
        actions = plan({"backend-x": desired}, driver.observe(), now or time.time())
        driver.execute(actions, {"backend-x": desired})
        return [a.kind for a in actions]

    try:
        assert one_pass(old) == [ActionKind.START]
        driver.mark_healthy("backend-x")  # v1 proved itself: no trial left
        assert one_pass(new) == [ActionKind.RESTART]
        assert not stopped(driver).active
        assert one_pass(new) == [ActionKind.START]
        seen = driver.observe()["backend-x"]
        assert (
            seen.content == new.content
            and seen.trial is not None
            and seen.trial.previous == old.content
        )
        assert one_pass(new, seen.trial.since + 6) == [ActionKind.ROLLBACK]  # never healthy
        assert not stopped(driver).active
        assert one_pass(new) == [ActionKind.START]  # what it was rolled back to
        seen = driver.observe()["backend-x"]
        assert seen.active and seen.content == old.content
        assert seen.rejected is not None and seen.rejected.content == new.content
        assert (
            "not healthy within 5s" in seen.rejected.reason
            and seen.rejected.until > time.time() + 200
        )
        assert one_pass(new) == [ActionKind.WAIT]  # the new settings wait out their backoff
    finally:
        driver.halt("backend-x", forget=True)
    assert not (tmp_path / "history" / "backend-x.json").exists()


def test_unit_history_sweeps_what_a_killed_writer_left(tmp_path):
    """A reconciler SIGKILLed mid-write of a unit's history left `.NAME.json.PID.*.tmp`."""
    from reconciler.drivers.history import HistoryStore

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose writer is gone
    left = tmp_path / "history" / f".backend-x.json.{dead.pid}.abc.tmp"
    left.parent.mkdir()
    left.write_text("{")
    HistoryStore(tmp_path)
    assert not left.exists()


def _process(tmp_path):
    return lambda: ProcessDriver(tmp_path / "state")


def _systemd(tmp_path):
    from reconciler.drivers.systemd import SystemdDriver
    from tests.test_systemd_driver import FakeSystemctl

    fake = FakeSystemctl()  # systemd's own state outlives the reconciler, as it does
    return lambda: SystemdDriver(tmp_path / "units", systemctl=fake, state_dir=tmp_path / "state")


@pytest.mark.parametrize("make", [_process, _systemd], ids=["process", "systemd"])
def test_backoff_and_the_last_good_settings_outlive_the_controller_for_both_drivers(tmp_path, make):
    """Both drivers keep a unit's failed starts and its rolled-back settings in the same unit
    history on disk: a controller started again (a new driver, as `up` or `plan` builds)
    holds the bad settings off and keeps the backoff, instead of trying again at once."""
    from reconciler.backends.health import Health
    from reconciler.units.render import MANAGED_MARKER

    new_driver = make(tmp_path)
    systemd = new_driver().name == "systemd"

    def settings(seconds: int) -> str:
        if systemd:
            return f"{MANAGED_MARKER} backend-x\nExecStart=sleep {seconds}\n"
        return sleeper(seconds).content

    good = DesiredUnit("backend-x", settings(60))
    bad = DesiredUnit("backend-x", settings(61), health_timeout=5)

    def one_pass(desired, now=None, health=None):
        driver = new_driver()  # every pass a restarted controller: nothing kept in memory
        seen = driver.observe()
        if health is not None:
            seen = {n: replace(o, health=health) for n, o in seen.items()}
        actions = plan({"backend-x": desired}, seen, now or time.time())
        driver.execute(actions, {"backend-x": desired})
        if not systemd and actions and actions[0].kind in (ActionKind.RESTART, ActionKind.ROLLBACK):
            stopped(driver)  # a sleep stops at once: the next pass starts what follows
        return actions

    try:
        assert [a.kind for a in one_pass(good)] == [ActionKind.START]
        new_driver().mark_healthy("backend-x")  # the last good settings
        kinds = [a.kind for a in one_pass(bad)]
        if not systemd:
            assert kinds == [ActionKind.RESTART]
            kinds = [a.kind for a in one_pass(bad)]
        assert kinds[-1] in (ActionKind.START, ActionKind.RESTART)
        since = new_driver().observe()["backend-x"].trial.since
        assert [a.kind for a in one_pass(bad, since + 6, Health.DOWN)] == [ActionKind.ROLLBACK]
        if not systemd:
            assert [a.kind for a in one_pass(bad)] == [ActionKind.START]  # the restored ones
        seen = new_driver().observe()["backend-x"]
        assert seen.content == good.content and seen.rejected.content == bad.content
        [held] = one_pass(bad)
        assert held.kind is ActionKind.WAIT and "they were rolled back" in held.reason
        # A failed start: counted and backed off, the same on disk for both.
        new_driver().execute([Action(ActionKind.FAIL, "backend-x", "not healthy within 5s")], {})
        history = new_driver().history.load("backend-x")
        assert history.failures == 1 and history.retry_at > time.time()
    finally:
        if not systemd:
            new_driver().halt("backend-x", forget=True)
