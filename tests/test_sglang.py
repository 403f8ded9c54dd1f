"""SGLang, the fifth backend kind, added as one module (reconciler/backends/kinds/sglang.py), one
template (templates/sglang.service.j2) and one registry line. SGLang cannot be installed here
(it needs CUDA or a CPU build with its own kernels), so every SGLang answer in these tests is
recorded from SGLang's documentation (tests/fixtures/protocols/sglang/, sources in
tests/fixtures/protocols/README.md: docs.sglang.io "Production Metrics", "OpenAI APIs -
Completions", "SGLang Native APIs" and "Server Arguments") and replayed by a fake SGLang server.
What is tested against the real SGLang: nothing; the launch flags are the documented ones."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve

from reconciler.backends.commands import launch_for
from reconciler.backends.health import Health, probe
from reconciler.config.loader import ConfigError, validate_data
from reconciler.config.schema import BackendSpec, DesiredState, ModelSpec
from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.app import create_app
from reconciler.gpu.vram import estimate_vram
from reconciler.monitoring.dashboards import dashboard_files
from reconciler.monitoring.prometheus import scrape_config
from reconciler.units.render import backend_unit_spec, render_unit

FIXTURES = Path(__file__).parent / "fixtures" / "protocols" / "sglang"
CHAT = {
    "model": "alias",
    "messages": [{"role": "user", "content": "List 3 countries and their capitals."}],
}


def recorded(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def idle_metrics() -> bytes:
    """The documented /metrics with its gauges at rest: nothing running or queued, pool empty."""
    text = recorded("metrics.txt").decode()
    for gauge in ("num_running_reqs", "num_queue_reqs", "token_usage", "num_used_tokens"):
        text = re.sub(rf"^(sglang:{gauge}\{{[^}}]*\}}) \S+$", r"\1 0.0", text, flags=re.M)
    return text.encode()


def served_as(name: str) -> bytes:
    """The recorded /v1/models as a server started with --served-model-name NAME lists it."""
    models = json.loads(recorded("models.json"))
    models["data"][0]["id"] = name
    return json.dumps(models).encode()


def fake_sglang(metrics: bytes, served: str = "m", health: int = 200) -> RecordedUpstream:
    return RecordedUpstream({
        ("GET", "/health"): Recorded(status=health, body=b""),
        ("GET", "/v1/models"): Recorded(body=served_as(served)),
        ("GET", "/metrics"): Recorded(content_type="text/plain", body=metrics),
        ("POST", "/v1/chat/completions"): Recorded(body=recorded("chat_completion.json")),
    })  # fmt: skip


# -- the desired state, the launch line and the unit ------------------------------------------
GPU_BACKEND = BackendSpec(
    kind="sglang", model="m", port=30000, binary="/usr/bin/python3", tensor_parallel_size=2,
    gpu_memory_utilization=0.85, context_size=32768, parallel=64, kv_cache_dtype="fp8_e4m3",
    quantization="fp8",
)  # fmt: skip


def test_a_sglang_backend_gets_its_documented_launch_line():
    argv = launch_for("b", GPU_BACKEND, "qwen", "/models/qwen", [0, 1]).argv
    assert argv[:3] == ["/usr/bin/python3", "-m", "sglang.launch_server"]
    flags = {
        f: argv[i + 1]
        for i, f in enumerate(argv[:-1])
        if f.startswith("--") and not argv[i + 1].startswith("--")
    }
    assert flags["--model-path"] == "/models/qwen" and flags["--served-model-name"] == "qwen"
    assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "30000")
    assert (flags["--tp"], flags["--mem-fraction-static"]) == ("2", "0.85")
    assert (flags["--context-length"], flags["--max-running-requests"]) == ("32768", "64")
    assert (flags["--kv-cache-dtype"], flags["--quantization"]) == ("fp8_e4m3", "fp8")
    assert "--enable-metrics" in argv  # the sglang:* series the gateway scores load by
    assert "--enable-cache-report" in argv  # cached tokens in usage, for the routing
    on_cpu = launch_for(
        "b", BackendSpec(kind="sglang", model="m", port=30000, gpus=0), "m", "/m", []
    ).argv
    assert on_cpu[on_cpu.index("--device") + 1] == "cpu" and "--mem-fraction-static" not in on_cpu


def test_a_sglang_backend_renders_a_unit():
    launch = launch_for("b", GPU_BACKEND, "qwen", "/models/qwen", [0, 1])
    text = render_unit(
        backend_unit_spec("backend-b", GPU_BACKEND, "qwen", "/models/qwen", launch, [0, 1])
    )
    assert "sglang.launch_server --model-path /models/qwen" in text
    assert "CUDA_VISIBLE_DEVICES=0,1" in text
    assert "MemoryDenyWriteExecute=no" in text  # its kernels are compiled at run time
    assert "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK" in text


def test_sglang_settings_are_checked_per_kind():
    state = {
        "models": {"m": {"source": "pypi:x"}},
        "backends": {"b": {"kind": "sglang", "model": "m", "port": 30000}},
    }
    for key, value, message in (
        (
            "kv_cache_dtype",
            "q8_0",
            "backends.b.kv_cache_dtype: 'q8_0' is not an SGLang KV cache type",
        ),
        ("cache_ram_mib", 512, "backends.b.cache_ram_mib: only for kind llamacpp"),
        ("max_loaded_models", 2, "backends.b.max_loaded_models: only for kind ollama"),
    ):
        bad = json.loads(json.dumps(state))
        bad["backends"]["b"][key] = value
        with pytest.raises(ConfigError) as caught:
            validate_data(bad, "host.yaml")
        assert any(p.startswith(message) for p in caught.value.problems), caught.value.problems
    sharded = validate_data(
        {**state, "backends": {"b": {**state["backends"]["b"], "tensor_parallel_size": 2}}}, "h"
    )
    assert sharded.backends["b"].gpus_wanted == 2  # one GPU per shard, as vLLM and TGI


def test_sglang_reserves_its_static_fraction_of_each_gpu(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "num_attention_heads": 2})
    )
    estimate = estimate_vram(GPU_BACKEND, ModelSpec(source=f"path:{tmp_path}"), tmp_path)
    assert estimate.gpu_fraction == 0.85 and estimate.shards == 2
    assert "SGLang reserves 85% of each GPU" in estimate.note


def test_prometheus_scrapes_it_and_grafana_has_its_dashboard():
    state = DesiredState.model_validate({
        "host": "h", "models": {"m": {"source": "pypi:x"}},
        "backends": {"b": {"kind": "sglang", "model": "m", "port": 30000}},
    })  # fmt: skip
    (job,) = [
        j
        for j in scrape_config(state)["scrape_configs"]
        if j["job_name"] == "tensorforge-backend-b"
    ]
    assert (
        job["metrics_path"] == "/metrics" and job["static_configs"][0]["labels"]["kind"] == "sglang"
    )
    dashboard = json.loads(dashboard_files()["tensorforge-sglang.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any("sglang:num_queue_reqs" in e for e in exprs)
    assert (
        Path(__file__).parents[1] / "monitoring" / "dashboards" / "tensorforge-sglang.json"
    ).is_file()


# -- probed, scored and proxied against a fake SGLang replaying its documentation ----------------
def test_the_probe_waits_for_startup_and_checks_the_served_name():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    upstream = fake_sglang(recorded("metrics.txt"), health=503)
    with serve(upstream, port):
        assert probe(url, "sglang", model="m").state is Health.LOADING  # 503 while it starts
        upstream.routes[("GET", "/health")] = Recorded(body=b"")
        assert probe(url, "sglang", model="m").state is Health.HEALTHY
        wrong = probe(url, "sglang", model="other")
        assert wrong.state is Health.UNHEALTHY and "--served-model-name other" in wrong.detail


def test_running_and_queued_requests_are_its_load_and_token_usage_its_kv_use():
    load = adapter_for("sglang").parse_load(recorded("metrics.txt").decode())
    assert load.requests == 162.0 + 2826.0 and load.kv_usage == pytest.approx(0.28)
    idle = adapter_for("sglang").parse_load(idle_metrics().decode())
    assert idle.requests == 0.0 and idle.kv_usage == 0.0


@pytest.fixture
def two_sglangs():
    """A busy SGLang (the documented /metrics: 162 running, 2826 queued) and an idle one."""
    busy, idle = fake_sglang(recorded("metrics.txt")), fake_sglang(idle_metrics())
    ports = free_port(), free_port(), free_port()
    state = fleet_state(
        {"busy": f"http://127.0.0.1:{ports[0]}", "idle": f"http://127.0.0.1:{ports[1]}"},
        kind="sglang", health_interval=0.2, routing={"strategy": "least-load"},
    )  # fmt: skip
    app = create_app(state)
    with serve(busy, ports[0]), serve(idle, ports[1]), serve(app, ports[2]):
        yield app, {"busy": busy, "idle": idle}, f"http://127.0.0.1:{ports[2]}"


def test_requests_go_to_the_sglang_its_metrics_say_is_idle(two_sglangs):
    app, upstreams, gateway = two_sglangs
    busy = app.table.upstreams["busy"]
    deadline = time.monotonic() + 30
    while not (busy.healthy and busy.reported_load >= 2988 and app.table.upstreams["idle"].healthy):
        assert time.monotonic() < deadline, "the gateway never probed and scraped both SGLangs"
        time.sleep(0.05)
    assert busy.kv_usage == pytest.approx(0.28)
    chosen = {httpx.post(f"{gateway}/v1/chat/completions", json=CHAT).headers["x-tensorforge-backend"]
              for _ in range(4)}  # fmt: skip
    assert chosen == {"idle"}
    assert not [r for r in upstreams["busy"].received if r[0] == "POST"]


def test_chat_is_proxied_as_sglang_answers_it(two_sglangs):
    app, upstreams, gateway = two_sglangs
    deadline = time.monotonic() + 30
    while not app.table.upstreams["idle"].healthy:
        assert time.monotonic() < deadline, "the idle SGLang never became healthy"
        time.sleep(0.05)
    response = httpx.post(f"{gateway}/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.content == recorded("chat_completion.json")  # OpenAI's shape: passed through
    sent = upstreams[response.headers["x-tensorforge-backend"]].last("/v1/chat/completions")
    assert sent["model"] == "m"  # the alias rewritten to its --served-model-name
    assert sent["messages"] == CHAT["messages"]
