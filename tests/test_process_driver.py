"""The process driver on real (tiny) processes: records survive the supervisor, a process
whose pid was never recorded is recognised and adopted, and a stale one is replaced."""

from __future__ import annotations

import json
import os
import subprocess

from reconciler.drivers.process import UNIT_ENV, ProcessDriver, process_alive
from reconciler.plan import DesiredUnit


def sleeper(seconds: int = 60) -> DesiredUnit:
    content = json.dumps({"argv": ["sleep", str(seconds)], "env": {}}, indent=1) + "\n"
    return DesiredUnit("backend-x", content)


def test_start_stop_and_records(tmp_path):
    driver = ProcessDriver(tmp_path)
    driver.start(sleeper())
    record = driver.load("backend-x")
    assert process_alive(record.pid, record.start_ticks)
    assert driver.observe()["backend-x"].active
    driver.stop("backend-x")
    assert not driver.observe()["backend-x"].active
    driver.remove("backend-x")
    assert driver.observe() == {}


def test_an_unrecorded_process_of_the_unit_is_adopted_not_duplicated(tmp_path):
    driver = ProcessDriver(tmp_path)
    unit = sleeper()
    driver.start(unit)
    first = driver.load("backend-x")
    # The supervisor died after starting the process but before recording it.
    (tmp_path / "units" / "backend-x.json").unlink()
    fresh = ProcessDriver(tmp_path)
    fresh.start(unit)
    adopted = fresh.load("backend-x")
    try:
        assert adopted.pid == first.pid
    finally:
        fresh.stop("backend-x")
    assert not process_alive(first.pid, first.start_ticks)


def test_an_unrecorded_process_with_other_settings_is_replaced(tmp_path):
    driver = ProcessDriver(tmp_path)
    driver.start(sleeper(60))
    old = driver.load("backend-x")
    (tmp_path / "units" / "backend-x.json").unlink()
    fresh = ProcessDriver(tmp_path)
    fresh.start(sleeper(61))
    new = fresh.load("backend-x")
    try:
        assert new.pid != old.pid
        assert not process_alive(old.pid, old.start_ticks)
        environ = open(f"/proc/{new.pid}/environ", "rb").read().decode()
        assert f"{UNIT_ENV}=" in environ
    finally:
        fresh.stop("backend-x")


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
