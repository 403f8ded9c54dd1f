"""The Ollama surface against recorded backends, with the official `ollama` Python client.

Backends here are fakes that record what the gateway sends them and answer with recorded
responses (tests/fakes/recording_backend.py): llama.cpp's tool call in the OpenAI shape its
server returns (streamed as docs/function-calling.md describes), llama.cpp's native
/completion answer recorded from the real server (the shape /infill answers with; SmolLM2
has no fill-in-the-middle tokens, so the real /infill refuses it), and Ollama's own answers
from its docs/api.md ("Chat request (with tools)", "List Local Models", "Pull a Model").
The same surface against the real llama.cpp server is tests/test_ollama_e2e.py."""

from __future__ import annotations

import json
import time

import httpx
import ollama
import pytest
from conftest import free_port
from fakes.recording_backend import FIXTURES, RecordingBackend, Route, llamacpp_tools_backend
from fakes.upstreams import Recorded, RecordedUpstream, fleet_state, serve

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Istanbul?"}]


@pytest.fixture
def backend_of():
    """Start a fake backend of a kind behind a gateway; returns (backend, gateway URL)."""
    started = []

    def start(kind: str, backend: RecordingBackend | None = None, protocol: str | None = None,
              capabilities: list[str] | None = None):  # fmt: skip
        backend = backend or llamacpp_tools_backend()
        up, gw = free_port(), free_port()
        state = fleet_state({"b": f"http://127.0.0.1:{up}"}, kind=kind)
        # A backend elsewhere has no model file here to read capabilities from: declared.
        update = {"protocol": protocol} if protocol else {}
        if capabilities is not None:
            update["capabilities"] = capabilities
        if update:
            state = state.model_copy(
                update={"backends": {"b": state.backends["b"].model_copy(update=update)}}
            )
        cms = [serve(backend, up), serve(create_app(state), gw)]
        for cm in cms:
            cm.__enter__()
        started.extend(cms)
        return backend, f"http://127.0.0.1:{gw}"

    yield start
    for cm in reversed(started):
        cm.__exit__(None, None, None)


def test_tools_reach_llamacpp_and_the_call_comes_back(backend_of):
    backend, url = backend_of("llamacpp")
    client = ollama.Client(host=url)
    answer = client.chat(model="m", messages=ASK, tools=[WEATHER])
    sent = backend.last("/v1/chat/completions")
    assert sent["tools"][0]["function"]["name"] == "get_current_weather"
    assert sent["tools"][0]["function"]["parameters"]["required"] == ["location"]
    call = answer.message.tool_calls[0].function
    assert call.name == "get_current_weather" and call.arguments == {"location": "Istanbul, Turkey"}
    assert (
        answer.done_reason == "stop" and answer.eval_count == 16 and answer.prompt_eval_count == 44
    )
    assert (
        answer.eval_duration == 410_250_000 and answer.prompt_eval_duration == 120_500_000
    )  # llama.cpp's timings


def test_a_streamed_tool_call_arrives_whole(backend_of):
    backend, url = backend_of("llamacpp")
    parts = list(
        ollama.Client(host=url).chat(model="m", messages=ASK, tools=[WEATHER], stream=True)
    )
    assert backend.last("/v1/chat/completions")["stream"] is True
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.arguments == {"location": "Istanbul, Turkey"}
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 16


def test_tool_calls_in_the_history_keep_their_pairing(backend_of):
    """The assistant's earlier call and the tool's answer reach the backend as OpenAI expects:
    arguments as JSON text, the answer tied to the call by id."""
    backend, url = backend_of("llamacpp")
    history = [*ASK,
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_current_weather",
                                                                               "arguments": {"location": "Istanbul"}}}]},
               {"role": "tool", "content": "22 C, sunny", "tool_name": "get_current_weather"}]  # fmt: skip
    ollama.Client(host=url).chat(model="m", messages=history, tools=[WEATHER])
    sent = backend.last("/v1/chat/completions")["messages"]
    call = sent[1]["tool_calls"][0]
    assert (
        json.loads(call["function"]["arguments"]) == {"location": "Istanbul"}
        and call["type"] == "function"
    )
    assert sent[2] == {
        "role": "tool",
        "content": "22 C, sunny",
        "tool_call_id": call["id"],
        "name": "get_current_weather",
    }


def test_every_sampling_option_reaches_llamacpp_under_its_own_name(backend_of):
    """Ollama's "Generate request (With options)" sampling options, as llama.cpp reads them."""
    backend, url = backend_of("llamacpp")
    options = {"num_keep": 5, "seed": 42, "num_predict": 100, "top_k": 20, "top_p": 0.9, "min_p": 0.0,
               "typical_p": 0.7, "repeat_last_n": 33, "temperature": 0.8, "repeat_penalty": 1.2,
               "presence_penalty": 1.5, "frequency_penalty": 1.0, "mirostat": 1, "mirostat_tau": 0.8,
               "mirostat_eta": 0.6, "stop": ["\n", "user:"]}  # fmt: skip
    ollama.Client(host=url).generate(
        model="m", prompt="Why is the sky blue?", raw=True, options=options
    )
    sent = backend.last("/v1/completions")
    assert sent["prompt"] == "Why is the sky blue?"
    expected = {"n_keep": 5, "seed": 42, "max_tokens": 100, "top_k": 20, "top_p": 0.9, "min_p": 0.0, "typical_p": 0.7,
                "repeat_last_n": 33, "temperature": 0.8, "repeat_penalty": 1.2, "presence_penalty": 1.5,
                "frequency_penalty": 1.0, "mirostat": 1, "mirostat_tau": 0.8, "mirostat_eta": 0.6, "stop": ["\n", "user:"]}  # fmt: skip
    assert {k: sent[k] for k in expected} == expected


@pytest.mark.parametrize(
    "option", ["num_gpu", "num_thread", "use_mmap", "numa", "penalize_newline", "tfs_z", "bogus"]
)
def test_options_that_cannot_be_honoured_are_refused_by_name(backend_of, option):
    backend, url = backend_of("llamacpp")
    response = httpx.post(
        f"{url}/api/chat", json={"model": "m", "messages": ASK, "options": {option: 1}}
    )
    assert response.status_code == 400 and f"options.{option}" in response.json()["error"]
    assert not backend.requests  # nothing reached the backend


def test_vllm_gets_its_own_names_and_refuses_what_it_lacks(backend_of):
    backend, url = backend_of("vllm")
    client = ollama.Client(host=url)
    client.chat(model="m", messages=ASK, options={"top_k": 1, "min_p": 0.1, "repeat_penalty": 1.3})
    sent = backend.last("/v1/chat/completions")
    assert (sent["top_k"], sent["min_p"], sent["repetition_penalty"]) == (
        1,
        0.1,
        1.3,
    ) and "repeat_penalty" not in sent
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="m", messages=ASK, options={"mirostat": 2})
    assert (
        refused.value.status_code == 400
        and "options.mirostat" in refused.value.error
        and "vLLM" in refused.value.error
    )


def test_tgi_generate_parameters(backend_of):
    backend, url = backend_of("tgi")
    ollama.Client(host=url).generate(
        model="m",
        prompt="x",
        raw=True,
        options={"top_k": 3, "typical_p": 0.5, "repeat_penalty": 1.1, "num_predict": 7},
    )
    params = backend.last("/generate")["parameters"]
    assert (
        params["top_k"],
        params["typical_p"],
        params["repetition_penalty"],
        params["max_new_tokens"],
    ) == (3, 0.5, 1.1, 7)
    response = httpx.post(
        f"{url}/api/chat", json={"model": "m", "messages": ASK, "options": {"top_k": 3}}
    )
    assert (
        response.status_code == 400 and "options.top_k" in response.json()["error"]
    )  # TGI's Messages API has none


def test_a_generic_openai_server_refuses_llamacpp_only_options(backend_of):
    _, url = backend_of("llamacpp", protocol="openai")
    response = httpx.post(
        f"{url}/api/generate", json={"model": "m", "prompt": "x", "options": {"min_p": 0.1}}
    )
    assert response.status_code == 400 and "options.min_p" in response.json()["error"]


def test_suffix_is_llamacpp_infill(backend_of):
    backend, url = backend_of("llamacpp", capabilities=["completion", "insert"])
    client = ollama.Client(host=url)
    answer = client.generate(
        model="m",
        prompt="def add(a, b):",
        suffix="    return c",
        options={"temperature": 0, "num_predict": 6},
    )
    sent = backend.last("/infill")
    assert (sent["input_prefix"], sent["input_suffix"], sent["n_predict"]) == (
        "def add(a, b):",
        "    return c",
        6,
    )
    assert (
        answer.response == "\n    a += b\n\n"
        and answer.eval_count == 6
        and answer.prompt_eval_count == 7
    )
    parts = list(
        client.generate(model="m", prompt="def add(a, b):", suffix="    return c", stream=True)
    )
    assert "".join(p.response for p in parts) == "\n    a +=" and parts[-1].done_reason == "length"
    assert parts[-1].eval_duration == 149_173_000  # from llama.cpp's timings


def test_suffix_on_a_backend_without_fill_in_the_middle_is_refused(backend_of):
    backend, url = backend_of("vllm")
    response = httpx.post(f"{url}/api/generate", json={"model": "m", "prompt": "a", "suffix": "b"})
    assert response.status_code == 400 and "'suffix'" in response.json()["error"]
    assert not backend.requests


@pytest.mark.parametrize("body, named", [
    ({"template": "{{ .Prompt }}"}, "'template'"), ({"context": [1, 2, 3]}, "'context'"),
    ({"keep_alive": 0}, "'keep_alive'"), ({"format": "yaml"}, "'format'"), ({"think": "max"}, "'think'"),
    ({"images": "abc"}, "'images'"), ({"raw": "yes"}, "'raw'"), ({"raw": True, "logprobs": True}, "'logprobs'"), ({"top_logprobs": 3}, "'top_logprobs'"),
])  # fmt: skip
def test_generate_fields_that_cannot_be_mapped_are_refused_by_name(backend_of, body, named):
    backend, url = backend_of("llamacpp")
    response = httpx.post(f"{url}/api/generate", json={"model": "m", "prompt": "hi", **body})
    assert response.status_code == 400 and named in response.json()["error"], response.text
    assert not backend.requests


def test_format_think_images_and_system_are_mapped(backend_of):
    backend, url = backend_of(
        "llamacpp", capabilities=["completion", "vision", "json_schema", "thinking"]
    )
    client = ollama.Client(host=url)
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    client.generate(
        model="m",
        prompt="Describe",
        system="Be brief",
        images=[png],
        format=schema,
        think=True,
        keep_alive="10m",
    )
    sent = backend.last("/v1/chat/completions")
    assert sent["messages"][0] == {"role": "system", "content": "Be brief"}
    assert sent["messages"][1]["content"][1]["image_url"]["url"] == f"data:image/png;base64,{png}"
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    client.chat(model="m", messages=ASK, format="json", think=False)
    sent = backend.last("/v1/chat/completions")
    assert sent["response_format"] == {"type": "json_object"} and sent["chat_template_kwargs"] == {
        "enable_thinking": False
    }


def test_ollama_backends_get_the_request_as_it_is():
    """A model served by Ollama: its own request, options and tools untouched, its own answer
    (the recorded "Chat request (with tools)" response)."""
    upstream = RecordedUpstream({
        ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
        ("POST", "/api/chat"): Recorded(body=(FIXTURES / "ollama" / "chat_tools.json").read_bytes()),
        ("POST", "/api/generate"): Recorded(body=(FIXTURES / "ollama" / "generate.json").read_bytes()),
    })  # fmt: skip
    up, gw = free_port(), free_port()
    state = fleet_state({"box": f"http://127.0.0.1:{up}"}, kind="ollama", source="ollama:llama3.2")
    with serve(upstream, up), serve(create_app(state), gw):
        client = ollama.Client(host=f"http://127.0.0.1:{gw}")
        answer = client.chat(
            model="alias",
            messages=ASK,
            tools=[WEATHER],
            options={"num_ctx": 8192, "top_k": 1},
            think=True,
        )
        sent = upstream.last("/api/chat")
        assert (
            sent["model"] == "llama3.2"
            and sent["tools"][0]["function"]["name"] == "get_current_weather"
        )
        assert sent["options"] == {"num_ctx": 8192, "top_k": 1} and sent["think"] is True
        assert answer.message.tool_calls[0].function.arguments == {
            "format": "celsius",
            "location": "Paris, FR",
        }
        client.generate(model="m", prompt="def f(", suffix="return 1", context=[1, 2], keep_alive=0)
        sent = upstream.last("/api/generate")
        assert (sent["suffix"], sent["context"], sent["keep_alive"]) == ("return 1", [1, 2], 0)
        client.generate(model="m", keep_alive=0)  # Ollama's "unload a model": Ollama's to do
        sent = upstream.last("/api/generate")
        assert sent["keep_alive"] == 0 and "prompt" not in sent


def test_unknown_model_is_404_whatever_the_body(backend_of):
    _, url = backend_of("llamacpp")
    for path, body in (("/api/chat", {"model": "gpt-9", "messages": []}), ("/api/generate", {"model": "gpt-9"}),
                       ("/api/chat", {"model": "gpt-9", "messages": "x"}), ("/api/show", {"model": "gpt-9"}),
                       ("/api/embed", {"model": "gpt-9", "input": 5})):  # fmt: skip
        response = httpx.post(url + path, json=body)
        assert response.status_code == 404 and "gpt-9" in response.json()["error"], (
            path,
            response.text,
        )


def test_errors_never_show_python_internals(backend_of):
    _, url = backend_of("llamacpp")
    for body in ({"model": "m", "messages": [{"role": "user", "content": 5}]}, {"model": "m", "messages": [[]]},
                 {"model": "m", "messages": ASK, "tools": [{"function": 3}]}, {"model": 7},
                 {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}]}):  # fmt: skip
        response = httpx.post(f"{url}/api/chat", json=body)
        error = response.json()["error"]
        assert response.status_code == 400 and not any(
            w in error for w in ("Error", "object has no", "Traceback")
        ), error


def test_load_answer_and_management_verbs(backend_of):
    _, url = backend_of("llamacpp")
    loaded = httpx.post(f"{url}/api/chat", json={"model": "alias", "messages": []}).json()
    assert loaded["done_reason"] == "load" and loaded["done"] is True
    for verb in ("copy", "create", "push"):
        response = httpx.post(
            f"{url}/api/{verb}", json={"source": "m", "destination": "n", "model": "m"}
        )
        assert response.status_code == 501 and "TensorForge" in response.json()["error"]
    response = httpx.request("DELETE", f"{url}/api/delete", json={"model": "m"})
    assert response.status_code == 409 and "backend(s) b" in response.json()["error"]
    assert httpx.request("DELETE", f"{url}/api/delete", json={"model": "nope"}).status_code == 404


def test_pull_of_a_model_neither_declared_nor_in_the_catalog_is_404(backend_of):
    _, url = backend_of("llamacpp")
    response = httpx.post(f"{url}/api/pull", json={"model": "llama3.2"})
    assert response.status_code == 404 and "catalog" in response.json()["error"]


def test_documented_shapes_are_what_the_client_parses():
    """The recorded Ollama answers parse into the client's types: the fields our answers fill."""
    tools = ollama.ChatResponse.model_validate_json(
        (FIXTURES / "ollama" / "chat_tools.json").read_text()
    )
    assert tools.message.tool_calls[0].function.name == "get_current_weather"
    statuses = [
        json.loads(line)["status"]
        for line in (FIXTURES / "ollama" / "pull_stream.ndjson").read_text().splitlines()
    ]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    shown = ollama.ShowResponse.model_validate_json((FIXTURES / "ollama" / "show.json").read_text())
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 8192


def test_embed_refuses_sampling_options(backend_of):
    backend, url = backend_of(
        "llamacpp", backend=RecordingBackend({"/v1/embeddings": Route(Recorded(body=b"{}"))})
    )
    response = httpx.post(
        f"{url}/api/embed", json={"model": "m", "input": "x", "options": {"temperature": 1}}
    )
    assert response.status_code == 400 and "temperature" in response.json()["error"]
    assert not backend.requests


def test_num_ctx_above_the_backends_context_is_clamped_and_said(backend_of):
    """The backend's context is fixed at launch: a larger num_ctx gets what there is (as
    Ollama clamps to the trained context), and the answer says how much."""
    backend = llamacpp_tools_backend()
    up, gw = free_port(), free_port()
    state = fleet_state({"b": f"http://127.0.0.1:{up}"}).model_dump()
    state["backends"]["b"] |= {"context_size": 2048, "parallel": 2}
    with serve(backend, up), serve(create_app(DesiredState.model_validate(state)), gw):
        url = f"http://127.0.0.1:{gw}/api/chat"
        big = httpx.post(
            url, json={"model": "m", "messages": ASK, "stream": False, "options": {"num_ctx": 8192}}
        )
        small = httpx.post(
            url, json={"model": "m", "messages": ASK, "stream": False, "options": {"num_ctx": 512}}
        )
        long = httpx.post(
            url,
            json={"model": "m", "messages": ASK, "stream": False, "options": {"num_predict": 4096}},
        )
    # A ceiling, as in Ollama: what fits in one slot's 1024 tokens beside the (short) prompt.
    assert (
        long.status_code == 200 and 900 < backend.last("/v1/chat/completions")["max_tokens"] <= 1024
    )
    assert long.headers["x-tensorforge-max-tokens"].startswith(
        str(backend.last("/v1/chat/completions")["max_tokens"])
    )
    assert big.status_code == 200 and big.headers["x-tensorforge-num-ctx"] == "1024"
    assert small.status_code == 200 and "x-tensorforge-num-ctx" not in small.headers
    assert "num_ctx" not in backend.last(
        "/v1/chat/completions"
    )  # nothing a llama.cpp request could change


def test_embed_on_ollama_backends_is_native_and_dimensions_needs_a_backend_that_has_it(backend_of):
    upstream = RecordedUpstream({
        ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
        ("POST", "/api/embed"): Recorded(body=(FIXTURES / "ollama" / "embed.json").read_bytes()),
    })  # fmt: skip
    up, gw = free_port(), free_port()
    state = fleet_state(
        {"box": f"http://127.0.0.1:{up}"}, kind="ollama", source="ollama:all-minilm"
    )
    with serve(upstream, up), serve(create_app(state), gw):
        client = ollama.Client(host=f"http://127.0.0.1:{gw}")
        answer = client.embed(
            model="alias",
            input="Why is the sky blue?",
            truncate=False,
            dimensions=8,
            keep_alive="1m",
        )
        sent = upstream.last("/api/embed")
    assert (sent["model"], sent["truncate"], sent["dimensions"], sent["keep_alive"]) == (
        "all-minilm",
        False,
        8,
        "1m",
    )
    assert answer.model == "alias" and answer.embeddings[0][:2] == [0.010071029, -0.0017594862]
    _, url = backend_of("llamacpp")
    response = httpx.post(f"{url}/api/embed", json={"model": "m", "input": "x", "dimensions": 8})
    assert response.status_code == 400 and "'dimensions'" in response.json()["error"]


def test_a_model_ollama_holds_is_described_by_ollama():
    """No file here: /api/tags, /api/ps and /api/show take the backend's own answers (its
    documented "List Local Models", "List Running Models" and "Show Model Information")."""
    upstream = RecordedUpstream({
        ("HEAD", "/"): Recorded(content_type="text/plain", body=b"Ollama is running"),
        ("GET", "/api/tags"): Recorded(body=(FIXTURES / "ollama" / "tags.json").read_bytes()),
        ("GET", "/api/ps"): Recorded(body=(FIXTURES / "ollama" / "ps.json").read_bytes()),
        ("POST", "/api/show"): Recorded(body=(FIXTURES / "ollama" / "show.json").read_bytes()),
    })  # fmt: skip
    up, gw = free_port(), free_port()
    state = fleet_state(
        {"box": f"http://127.0.0.1:{up}"}, kind="ollama", source="ollama:deepseek-r1"
    )
    with serve(upstream, up), serve(create_app(state), gw):
        client = ollama.Client(host=f"http://127.0.0.1:{gw}")
        deadline = time.monotonic() + 5
        while (
            not client.ps().models and time.monotonic() < deadline
        ):  # until the backend is probed healthy
            time.sleep(0.1)
        listed = client.list().models
        shown = client.show("alias")
        running = httpx.get(f"http://127.0.0.1:{gw}/api/ps").json()["models"]
    assert [m.model for m in listed] == ["m"] and listed[0].size == 4683075271
    assert listed[0].digest == "0a8c266910232fd3291e71e5ba1e058cc5af9d411192cf88b6d30e92b6e73163"
    assert listed[0].details.parameter_size == "7.6B" and listed[0].details.family == "qwen2"
    assert (
        upstream.last("/api/show") == {"model": "deepseek-r1"}
        and shown.details.parameter_size == "8.0B"
    )
    assert (
        running[0]["model"] == "m" and running[0]["size"] == 0
    )  # not in the backend's /api/ps: not loaded


def test_a_failing_pull_ends_with_the_reason(tmp_path, monkeypatch):
    """A declared file that is not there: the stream's last line is the error, and without
    streaming the answer is a 500 naming it (Ollama's shape), never a traceback."""
    monkeypatch.setenv("TF_MODELS", str(tmp_path))
    up, gw = free_port(), free_port()
    state = fleet_state({"b": f"http://127.0.0.1:{up}"}, source=f"path:{tmp_path}/missing.gguf")
    with serve(llamacpp_tools_backend(), up), serve(create_app(state), gw):
        client = ollama.Client(host=f"http://127.0.0.1:{gw}")
        with pytest.raises(ollama.ResponseError) as streamed:
            list(client.pull("alias", stream=True))
        whole = httpx.post(f"http://127.0.0.1:{gw}/api/pull", json={"model": "m", "stream": False})
    assert "missing.gguf does not exist" in streamed.value.error
    assert whole.status_code == 500 and "missing.gguf does not exist" in whole.json()["error"]


def test_generate_context_carries_the_conversation(backend_of):
    """`context` from one answer, handed back, becomes the chat history of the next request."""
    backend, url = backend_of("llamacpp", backend=RecordingBackend({"/v1/chat/completions": Route(
        Recorded(body=(FIXTURES / "vllm" / "chat_completion.json").read_bytes()))}))  # fmt: skip
    client = ollama.Client(host=url)
    first = client.generate(model="m", prompt="My name is Zed.", system="Be brief")
    reply = json.loads((FIXTURES / "vllm" / "chat_completion.json").read_text())["choices"][0][
        "message"
    ]["content"]
    assert first.response == reply and first.context
    client.generate(model="m", prompt="What is my name?", context=first.context, system="Be brief")
    assert backend.last("/v1/chat/completions")["messages"] == [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "My name is Zed."},
        {"role": "assistant", "content": reply}, {"role": "user", "content": "What is my name?"},
    ]  # fmt: skip
