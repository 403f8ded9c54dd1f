"""SystemdDriver and the controller's systemd path against a fake systemctl: file writes,
one daemon-reload per pass, plan order, a change on trial rolled back by the plan (never a
wait inside the driver), and the CLI's plan/render."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from reconciler.backends.health import BackendHealth, Health
from reconciler.cli import main
from reconciler.controller import Controller, make_driver
from reconciler.drivers.history import UnitHistory
from reconciler.drivers.process import ProcessDriver
from reconciler.drivers.systemd import SystemdDriver, SystemdError
from reconciler.gpu.inventory import StaticInventory
from reconciler.plan import Action, ActionKind, DesiredUnit, plan
from reconciler.units.render import MANAGED_MARKER


class FakeSystemctl:
    """Records every call; `active` is what `show` reports; `fail` makes verbs fail; a unit
    in `slow` stays `deactivating` (its stop job running) after a stop until `finish`."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.active: dict[str, str] = {}
        self.fail: set[tuple[str, str]] = set()
        self.slow: set[str] = set()
        self.environment: dict[str, str] = {}  # a unit's Environment as systemd loaded it

    def finish(self, unit: str) -> None:
        self.active[unit] = "inactive"

    def __call__(self, args):
        args = list(args)
        self.calls.append(args)
        verb = args[0]
        if verb == "show":
            units = [a for a in args[1:] if a.endswith(".service")]
            blocks = [
                f"Id={u}\nActiveState={self.active.get(u, 'inactive')}\nSubState=running\n"
                f"Result=success\nMainPID={100 if self.active.get(u) == 'active' else 0}\nNRestarts=0\n"
                f"Job={7 if self.active.get(u) in ('deactivating', 'activating') else ''}\n"
                f"Environment={self.environment.get(u, '')}"
                for u in units
            ]
            return subprocess.CompletedProcess(args, 0, "\n\n".join(blocks) + "\n", "")
        if (verb, args[-1]) in self.fail:
            return subprocess.CompletedProcess(args, 1, "", f"{verb} failed")
        if verb in ("start", "restart"):
            self.active[args[-1]] = "active"
        elif verb == "stop":
            self.active[args[-1]] = "deactivating" if args[-1] in self.slow else "inactive"
        return subprocess.CompletedProcess(args, 0, "", "")

    def verbs(self) -> list[str]:
        return [" ".join(c) for c in self.calls if c[0] not in ("show", "reset-failed")]


def unit(name: str, text: str) -> DesiredUnit:
    return DesiredUnit(name, f"{MANAGED_MARKER} {name}\n{text}\n")


def driver(tmp_path: Path, fake: FakeSystemctl) -> SystemdDriver:
    return SystemdDriver(tmp_path / "units", systemctl=fake, state_dir=tmp_path / "state")


def probed(observed: dict, health: Health, detail: str = "") -> dict:
    """What the controller adds to the driver's observation: the probe's answer."""
    from dataclasses import replace

    return {n: replace(o, health=health, detail=detail) for n, o in observed.items()}


def test_apply_writes_reloads_once_and_acts_in_plan_order(tmp_path: Path) -> None:
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    (tmp_path / "units").mkdir()
    old = unit("backend-old", "old")
    (tmp_path / "units" / "tensorforge-backend-old.service").write_text(old.content)
    fake.active["tensorforge-backend-old.service"] = "active"
    desired = {"backend-a": unit("backend-a", "a"), "gateway": unit("gateway", "g")}
    actions = [
        Action(ActionKind.STOP, "backend-old", "no longer declared"),
        Action(ActionKind.START, "backend-a", "declared"),
        Action(ActionKind.START, "gateway", "declared"),
    ]
    done: list[tuple[str, str | None]] = []
    d.execute(actions, desired, lambda a, error: done.append((a.unit, error)))
    assert done == [("backend-old", None), ("backend-a", None), ("gateway", None)]
    assert fake.verbs() == [
        "daemon-reload",
        "stop --no-block tensorforge-backend-old.service",
        "start --no-block tensorforge-backend-a.service",
        "start --no-block tensorforge-gateway.service",
    ]
    assert (tmp_path / "units" / "tensorforge-backend-a.service").read_text() == desired[
        "backend-a"
    ].content
    # Asked to stop, not waited for: its file goes once it has stopped, by the next pass's plan.
    assert (tmp_path / "units" / "tensorforge-backend-old.service").exists()
    [remove] = plan(desired, d.observe(), time.time())
    assert (remove.kind, remove.unit) == (
        ActionKind.STOP,
        "backend-old",
    ) and "already stopped" in remove.reason
    fake.calls.clear()
    d.execute([remove], desired)
    assert fake.verbs() == ["daemon-reload"]
    assert not (tmp_path / "units" / "tensorforge-backend-old.service").exists()
    assert set(d.observe()) == {"backend-a", "gateway"}


def test_the_driver_reports_each_action_done_right_after_its_systemctl_call(tmp_path: Path) -> None:
    """`done` follows each action's own systemctl call (errors are the action's), not the
    whole pass."""
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    (tmp_path / "units").mkdir()
    for name in ("backend-a", "backend-b"):
        (tmp_path / "units" / f"tensorforge-{name}.service").write_text(unit(name, "v1").content)
        fake.active[f"tensorforge-{name}.service"] = "active"
    events: list[str] = []
    desired = {"backend-a": unit("backend-a", "v2"), "backend-b": unit("backend-b", "v1"),
               "backend-new": unit("backend-new", "v1")}  # fmt: skip
    actions = [
        Action(ActionKind.RESTART, "backend-a", "settings changed"),
        Action(ActionKind.STOP, "backend-b", "placement refused"),
        Action(ActionKind.START, "backend-new", "declared"),
        Action(ActionKind.WAIT, "backend-c", "not the driver's"),
    ]
    d.execute(
        actions, desired, lambda a, _e: events.append(f"{a.kind} {a.unit} after {fake.verbs()[-1]}")
    )
    assert events == [
        "restart backend-a after restart --no-block tensorforge-backend-a.service",
        "stop backend-b after stop --no-block tensorforge-backend-b.service",
        "start backend-new after start --no-block tensorforge-backend-new.service",
    ]
    assert fake.verbs()[0] == "daemon-reload"  # one reload, before any verb


def test_changed_unit_that_stays_unhealthy_is_rolled_back_by_the_plan(tmp_path: Path) -> None:
    """The driver restarts and returns; passes observe the unit on trial; past its
    health_timeout the plan says ROLLBACK, and the same settings then wait out a backoff."""
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    (tmp_path / "units").mkdir()
    before = unit("backend-a", "v1")
    (tmp_path / "units" / "tensorforge-backend-a.service").write_text(before.content)
    fake.active["tensorforge-backend-a.service"] = "active"
    after = DesiredUnit("backend-a", unit("backend-a", "v2").content, health_timeout=20)
    desired = {"backend-a": after}
    d.execute(plan(desired, d.observe(), time.time()), desired)
    assert fake.verbs() == ["daemon-reload", "restart --no-block tensorforge-backend-a.service"]
    started = d.observe()["backend-a"].trial.since
    assert plan(desired, probed(d.observe(), Health.LOADING), started + 10) == []  # within its time
    actions = plan(desired, probed(d.observe(), Health.DOWN, "connection refused"), started + 21)
    assert [(a.kind, a.unit) for a in actions] == [(ActionKind.ROLLBACK, "backend-a")]
    assert "not healthy within 20s (down: connection refused)" in actions[0].reason
    fake.calls.clear()
    d.execute(actions, desired)
    assert (tmp_path / "units" / "tensorforge-backend-a.service").read_text() == before.content
    assert fake.verbs() == ["daemon-reload", "restart --no-block tensorforge-backend-a.service"]
    # The same rejected content is not tried again right away, by this driver or a new one.
    [held] = plan(desired, driver(tmp_path, fake).observe(), time.time())
    assert held.kind is ActionKind.WAIT and "rolled back (not healthy within 20s" in held.reason


def test_a_change_cut_short_after_its_file_is_written_is_restarted_next_pass(
    tmp_path: Path,
) -> None:
    """The new unit file is on disk but daemon-reload failed (or the reconciler was killed)
    before the restart: the file alone says there is nothing left to do while the old process
    runs the old settings. The pending mark makes the next pass, by a new driver too, restart
    it, and only a restart that went through clears it."""
    fake = FakeSystemctl()
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "tensorforge-backend-a.service").write_text(
        unit("backend-a", "v1").content
    )
    fake.active["tensorforge-backend-a.service"] = "active"
    desired = {"backend-a": unit("backend-a", "v2")}
    d = driver(tmp_path, fake)
    fake.fail.add(("daemon-reload", "daemon-reload"))
    with pytest.raises(SystemdError, match="daemon-reload"):
        d.execute(plan(desired, d.observe(), 0), desired)
    assert (tmp_path / "units" / "tensorforge-backend-a.service").read_text() == desired[
        "backend-a"
    ].content
    fake.fail.clear()
    fake.calls.clear()
    d = driver(tmp_path, fake)  # a reconciler started again
    actions = plan(desired, d.observe(), 0)
    assert [(a.kind, a.unit) for a in actions] == [(ActionKind.RESTART, "backend-a")]
    assert "-v1" in actions[0].diff and "+v2" in actions[0].diff  # from what probably still runs
    assert d.observe()["backend-a"].pending and "not applied" in actions[0].reason
    d.execute(actions, desired)
    assert fake.verbs() == ["daemon-reload", "restart --no-block tensorforge-backend-a.service"]
    assert plan(desired, d.observe(), 0) == []


def test_start_backoff_survives_thousands_of_failures(tmp_path: Path) -> None:
    """2**5000 does not fit a float: the backoff's exponent is capped."""
    d = driver(tmp_path, FakeSystemctl())
    d.history.save("backend-a", UnitHistory(failures=5000))
    d.execute([Action(ActionKind.FAIL, "backend-a", "not healthy")], {})
    history = d.history.load("backend-a")
    assert history.failures == 5001 and history.retry_at > 0


def test_unmanaged_and_reconciler_units_are_not_observed(tmp_path: Path) -> None:
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    units = tmp_path / "units"
    units.mkdir()
    (units / "tensorforge-hand-written.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "tensorforge-reconciler.service").write_text(f"{MANAGED_MARKER} reconciler\n")
    (units / "other.service").write_text(f"{MANAGED_MARKER} other\n")
    assert d.observe() == {}


def test_observe_without_systemd_treats_files_as_running(tmp_path: Path) -> None:
    def no_systemd(args):
        return subprocess.CompletedProcess(args, 1, "", "System has not been booted with systemd")

    d = SystemdDriver(tmp_path, systemctl=no_systemd)
    (tmp_path / "tensorforge-gateway.service").write_text(unit("gateway", "g").content)
    assert d.observe()["gateway"].active


def test_driver_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_DRIVER", raising=False)  # conftest pins the process driver
    assert isinstance(make_driver("process", tmp_path), ProcessDriver)
    assert isinstance(make_driver("systemd", tmp_path, tmp_path), SystemdDriver)
    assert isinstance(make_driver(None, tmp_path, tmp_path), SystemdDriver)  # a unit dir implies it
    monkeypatch.setattr("reconciler.controller.systemd_booted", lambda: False)
    monkeypatch.delenv("TF_DRIVER", raising=False)
    assert isinstance(make_driver(None, tmp_path), ProcessDriver)
    with pytest.raises(ValueError, match="--driver"):
        make_driver("docker", tmp_path)


HOST = """\
version: 1
models:
  m:
    source: path:{model}
backends:
  m-cpu:
    kind: llamacpp
    model: m
    port: {port}
    context_size: 1024
gateway:
  port: {gw}
"""


@pytest.fixture
def systemd_host(tmp_path: Path, host_yaml: Path, monkeypatch: pytest.MonkeyPatch):
    """A controller on the fake systemctl for host_yaml, every backend probing healthy."""
    fake = FakeSystemctl()
    controller = Controller(str(host_yaml), driver=driver(tmp_path, fake), gpus=StaticInventory([]))
    monkeypatch.setattr(
        "reconciler.controller.probe",
        lambda url, proto, timeout=1.0, **_: BackendHealth(Health.HEALTHY),
    )
    return controller, fake


@pytest.fixture
def host_yaml(tmp_path: Path, state_dir: Path) -> Path:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    path = tmp_path / "host.yaml"
    path.write_text(HOST.format(model=model, port=18501, gw=18502))
    return path


def test_controller_apply_is_a_no_op_the_second_time(
    tmp_path: Path, state_dir: Path, systemd_host
) -> None:
    controller, fake = systemd_host
    first = controller.reconcile_once()
    assert [a.kind for a in first] == [ActionKind.START, ActionKind.START]
    assert fake.verbs().count("daemon-reload") == 1
    fake.calls.clear()
    second = controller.reconcile_once()
    assert second == []
    assert fake.verbs() == []
    text = (tmp_path / "units" / "tensorforge-backend-m-cpu.service").read_text()
    assert "ExecStart=" in text and "--ctx-size 1024" in text
    # The gateway runs under its own user and HOME: it is told where the drain marks are.
    gateway = (tmp_path / "units" / "tensorforge-gateway.service").read_text()
    assert f'Environment="TF_DRAIN_DIR={state_dir / "drain"}"' in gateway.splitlines()


def test_cli_render_then_plan_exit_codes(tmp_path: Path, host_yaml: Path, capsys) -> None:
    out = tmp_path / "rendered"
    assert main(["render", "--config", str(host_yaml), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "tensorforge-backend-m-cpu.service",
        "tensorforge-gateway.service",
        "tensorforge-reconciler.service",
    ]
    capsys.readouterr()
    assert main(["plan", "--config", str(host_yaml), "--unit-dir", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    changed = host_yaml.read_text().replace("context_size: 1024", "context_size: 2048")
    host_yaml.write_text(changed)
    assert main(["plan", "--config", str(host_yaml), "--unit-dir", str(out)]) == 2
    printed = capsys.readouterr().out
    assert (
        "drain    backend-m-cpu: settings changed; taking it out of the gateway" in printed
    )  # as apply will
    assert "-ExecStart=" in printed and "+ExecStart=" in printed and "--ctx-size 2048" in printed
    host_yaml.write_text("version: 1\nbackends: {x: {kind: nope}}\n")
    assert main(["plan", "--config", str(host_yaml), "--unit-dir", str(out)]) == 1


def test_plan_shows_a_refusal_naming_the_gpu(tmp_path: Path, state_dir: Path) -> None:
    from tests.test_placement_vram import small_cards

    path = tmp_path / "host.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            version: 1
            models: {m: {source: "hf:org/m"}}
            backends:
              big: {kind: vllm, model: m, port: 18601, gpus: 1, gpu_ids: [1]}
            gateway: {enable: false}
            """
        )
    )
    controller = Controller(str(path), driver=driver(tmp_path, FakeSystemctl()), gpus=small_cards())
    controller.vram_estimates = lambda: {"big": 40 * 1024**3}
    actions = controller.plan()
    assert [(a.kind, a.unit) for a in actions] == [(ActionKind.REFUSE, "backend-big")]
    assert actions[0].reason == "GPU 1: needs 40.0 GiB, 8.0 GiB free"


def test_stopping_the_reconciler_leaves_systemd_units_running(systemd_host) -> None:
    controller, fake = systemd_host
    controller.reconcile_once()
    fake.calls.clear()
    controller.shutdown()
    assert fake.verbs() == []


def test_a_new_unit_that_never_gets_healthy_backs_off(tmp_path: Path) -> None:
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    new = DesiredUnit("backend-a", unit("backend-a", "v1").content, health_timeout=10)
    d.execute([Action(ActionKind.START, "backend-a", "declared")], {"backend-a": new})
    since = d.observe()["backend-a"].trial.since
    # Nothing ran before it: nothing to roll back to; a failed start, counted for backoff.
    [fail] = plan({"backend-a": new}, probed(d.observe(), Health.DOWN, "refused"), since + 11)
    assert fail.kind is ActionKind.FAIL and "not healthy within 10s" in fail.reason
    d.execute([fail], {"backend-a": new})
    fake.active["tensorforge-backend-a.service"] = "failed"  # systemd gave up on it
    actions = plan({"backend-a": new}, d.observe(), time.time())
    assert [a.kind for a in actions] == [ActionKind.WAIT]
    assert "down after 1 failed start(s); retrying in" in actions[0].reason
    d.mark_healthy("backend-a")
    assert d.observe()["backend-a"].retry_at == 0.0


def test_a_rolling_change_waits_for_the_drain_pass_by_pass_without_blocking(
    host_yaml: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch, systemd_host
) -> None:
    """The restart is marked for draining (DRAIN), then held (a WAIT naming what is open)
    while the gateway still has requests on the backend, for up to the backend's
    drain_timeout; each pass returns at once; a drain the plan no longer needs is dropped
    (UNDRAIN), and the backend is routed to again."""
    controller, fake = systemd_host
    controller.reconcile_once()
    gateway = {"in_flight": 2, "detail": "draining: the reconciler is about to stop it"}
    asked = []

    class Answer:
        def json(self):
            return {"backends": {"m-cpu": {"healthy": False, "circuit_open": False, **gateway}}}

    def get(url, timeout):
        asked.append(url)
        return Answer()

    monkeypatch.setattr("reconciler.drain.httpx.get", get)
    mark = state_dir / "drain" / "m-cpu"
    original = host_yaml.read_text()
    host_yaml.write_text(
        original.replace("context_size: 1024", "context_size: 2048\n    drain_timeout: 600")
    )

    fake.calls.clear()
    first = controller.reconcile_once()
    assert [(a.kind, a.unit) for a in first] == [(ActionKind.DRAIN, "backend-m-cpu")]
    # The gateway's /health is asked once a pass (drains, and wedged backends), never polled.
    assert mark.exists() and asked == ["http://127.0.0.1:18502/health"] and fake.verbs() == []
    held = controller.reconcile_once()
    assert [(a.kind, a.unit) for a in held] == [(ActionKind.WAIT, "backend-m-cpu")]
    assert "draining: 2 request(s) open" in held[0].reason
    assert "restart" not in " ".join(fake.verbs())
    assert asked == ["http://127.0.0.1:18502/health"] * 2  # one question per pass, no polling loop
    status = json.loads((state_dir / "status.json").read_text())
    assert "draining: 2 request(s) open" in status["units"][0]["detail"]  # `tensorforge status`

    mark.write_text(f"{time.time() - 100}\n")  # 100 s into the drain: past the default 30 s
    gateway["in_flight"] = 1
    assert controller.reconcile_once()[0].kind is ActionKind.WAIT

    # Reverted before the drain finished: nothing to restart, and the mark goes.
    host_yaml.write_text(original)
    assert [a.kind for a in controller.reconcile_once()] == [
        ActionKind.UNDRAIN
    ] and not mark.exists()
    assert controller.reconcile_once() == []

    host_yaml.write_text(
        original.replace("context_size: 1024", "context_size: 2048\n    drain_timeout: 600")
    )
    assert controller.reconcile_once()[0].kind is ActionKind.DRAIN and mark.exists()
    gateway["in_flight"] = 0
    done = controller.reconcile_once()
    assert [(a.kind, a.unit) for a in done] == [(ActionKind.RESTART, "backend-m-cpu")]
    assert "restart --no-block tensorforge-backend-m-cpu.service" in fake.verbs() and mark.exists()
    # Restarted (the fake's job is done at once): the next pass routes to it again.
    assert [a.kind for a in controller.reconcile_once()] == [
        ActionKind.UNDRAIN
    ] and not mark.exists()


def test_a_change_whose_model_is_missing_keeps_the_old_backend_routed(
    tmp_path: Path, host_yaml: Path, state_dir: Path, systemd_host
) -> None:
    """The model is checked off the pass: a PULL, then a WAIT naming the error; the running
    backend is neither drained nor restarted."""
    controller, fake = systemd_host
    controller.reconcile_once()
    moved = tmp_path / "gone" / "m.gguf"
    host_yaml.write_text(
        host_yaml.read_text().replace(f"path:{tmp_path / 'm.gguf'}", f"path:{moved}")
    )
    fake.calls.clear()
    [pull] = controller.reconcile_once()
    assert (pull.kind, pull.unit) == (ActionKind.PULL, "backend-m-cpu") and str(
        moved
    ) in pull.reason
    controller.puller.wait(10)
    held = controller.reconcile_once()
    assert [(a.kind, a.unit) for a in held] == [(ActionKind.WAIT, "backend-m-cpu")]
    assert "the model is not ready" in held[0].reason and str(moved) in held[0].reason
    assert "retrying in" in held[0].reason
    assert fake.verbs() == [] and not (state_dir / "drain" / "m-cpu").exists()  # not drained
    assert not controller.wait_healthy(1)  # `apply` does not call a change it could not make done


def test_a_units_gpus_are_what_systemd_loaded_not_what_its_file_says(tmp_path: Path) -> None:
    """Observed from `systemctl show -p Environment`, not parsed out of the rendered file: a
    file rewritten for GPU 0 while the unit still runs on GPU 1 holds GPU 1."""
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "tensorforge-backend-a.service").write_text(
        unit("backend-a", 'Environment="CUDA_VISIBLE_DEVICES=0"').content
    )
    fake.active["tensorforge-backend-a.service"] = "active"
    fake.environment["tensorforge-backend-a.service"] = (
        '"HOME=/var/lib/a b" CUDA_VISIBLE_DEVICES=1,2'
    )
    assert d.observe()["backend-a"].gpus == (1, 2)
    fake.active["tensorforge-backend-a.service"] = "inactive"  # nothing runs: nothing held
    assert d.observe()["backend-a"].gpus == ()


def test_a_stop_under_way_is_observed_and_waited_for_not_repeated(tmp_path: Path) -> None:
    """`stop --no-block` returns at once; while systemd's stop job runs (deactivating) the
    plan waits (systemd SIGKILLs past TimeoutStopSec itself), then removes the file."""
    fake = FakeSystemctl()
    d = driver(tmp_path, fake)
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "tensorforge-backend-old.service").write_text(
        unit("backend-old", "old").content
    )
    fake.active["tensorforge-backend-old.service"] = "active"
    fake.slow.add("tensorforge-backend-old.service")
    d.execute(plan({}, d.observe(), time.time()), {})
    assert fake.verbs() == ["stop --no-block tensorforge-backend-old.service"]
    seen = d.observe()["backend-old"]
    assert seen.stopping is not None and seen.stopping.kill_at is None
    fake.calls.clear()
    [wait] = plan({}, d.observe(), time.time())
    assert wait.kind is ActionKind.WAIT and "its supervisor kills it" in wait.reason
    d.execute([wait], {})
    assert fake.verbs() == []
    # Crash-looping under systemd's Restart= (activating, auto-restart job): not stopping.
    fake.active["tensorforge-backend-old.service"] = "activating"
    assert d.observe()["backend-old"].stopping is None
    fake.finish("tensorforge-backend-old.service")
    [remove] = plan({}, d.observe(), time.time())
    d.execute([remove], {})
    assert (
        not (tmp_path / "units" / "tensorforge-backend-old.service").exists() and d.observe() == {}
    )
