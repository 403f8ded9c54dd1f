"""Automatic selection without real servers: name resolution (placeholders, default_model,
model_aliases with patterns), each kind's tokens per request, the choice by context and
capabilities, clamping, what the backend receives (clamped max_tokens, trace headers) and
what comes back (its request id, its integer error codes). The same behaviour against real
llama.cpp servers is in test_clients_real.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from fakes.upstreams import CHAT_ANSWER, serve

from reconciler.config.schema import DesiredState
from reconciler.gateway.app import create_app
from reconciler.gateway.backend_info import read_metadata, request_context
from reconciler.gateway.router import RoutingTable
from reconciler.gateway.selection import Choice, Refusal, choose, request_needs
from reconciler.models.capabilities import model_capabilities


def state(backends: dict, **routing) -> DesiredState:
    return DesiredState.model_validate({
        "models": {"small": {"source": "pypi:x", "aliases": ["tiny"]}, "big": {"source": "pypi:y"}},
        "backends": backends,
        "gateway": {"routing": routing, "health_interval": 0.5},
    })  # fmt: skip


def backend(kind: str, model: str, context: int, parallel: int = 1, port: int = 1, **extra) -> dict:
    return {"kind": kind, "model": model, "port": port, "url": f"http://127.0.0.1:{port}",
            "context_size": context, "parallel": parallel, **extra}  # fmt: skip


TWO = {
    "s": backend("llamacpp", "small", 2048, parallel=2, port=1),
    "b": backend("vllm", "big", 8192, parallel=4, port=2),
}


def test_each_kind_keeps_its_own_tokens_per_request():
    """llama.cpp splits its context across slots; vLLM gives every sequence the whole
    max_model_len (issue 16, defect 1: vLLM was capped at context_size / parallel too)."""
    s = state(TWO)
    assert request_context(s.backends["s"]) == 1024
    assert request_context(s.backends["b"]) == 8192
    elsewhere = {"kind": "vllm", "model": "big", "port": 1, "url": "http://10.0.0.9:8000"}
    assert (
        request_context(state({"x": elsewhere}).backends["x"]) is None
    )  # undeclared: the backend judges


def test_names_resolve_declared_first_then_aliases_patterns_placeholders_and_default():
    table = RoutingTable.from_state(state(TWO, model_aliases={"current-model": "big", "local-*": "tiny",
                                                              "gpt-4*": "auto"}))  # fmt: skip
    resolve = table.resolve_request
    assert (resolve("tiny").model, resolve("tiny").via) == ("small", "name")
    assert (resolve("current-model").model, resolve("current-model").via) == (
        "big",
        "model_aliases",
    )
    assert resolve("local-llamacpp").model == "small"  # the pattern beats the placeholder
    assert (
        resolve("gpt-4o").model is None
        and resolve("auto").model is None
        and resolve("default").via == "auto"
    )
    assert resolve("gpt-3.5") is None  # unknown stays unknown: 404
    assert resolve(None).model is None
    assert (
        RoutingTable.from_state(state(TWO, default_model="tiny")).resolve_request(None).model
        == "small"
    )


def test_bad_routing_settings_name_the_field_and_the_fix():
    with pytest.raises(
        ValueError, match=r"gateway.routing.model_aliases.local-\*: 'nope' is not a model or alias"
    ):
        state(TWO, model_aliases={"local-*": "nope"})
    with pytest.raises(
        ValueError, match="gateway.routing.default_model: 'gone'.*use one of them or 'auto'"
    ):
        state(TWO, default_model="gone")
    with pytest.raises(ValueError, match="capabilities"):
        state({"s": backend("llamacpp", "small", 2048, capabilities=["telepathy"])})


def table_upstreams(s: DesiredState) -> list:
    table = RoutingTable.from_state(s)
    for u in table.upstreams.values():
        u.healthy = True
    return list(table.upstreams.values())


def test_the_choice_goes_where_the_request_fits_and_clamps_only_when_nothing_does():
    pool = table_upstreams(state(TWO))
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    needs = request_needs("/v1/chat/completions", {**ask, "max_tokens": 2000})
    choice = choose(needs, pool, 100, True, "auto")
    assert isinstance(choice, Choice) and choice.eligible == {"b"} and choice.max_tokens is None
    assert "s too small" in choice.reason
    huge = choose(
        request_needs("/v1/chat/completions", {**ask, "max_tokens": 100_000}),
        pool,
        100,
        True,
        "auto",
    )
    assert isinstance(huge, Choice) and huge.eligible == {"b"} and huge.max_tokens == 8192 - 100
    too_long = choose(request_needs("/v1/chat/completions", ask), pool, 9000, True, "auto")
    assert isinstance(too_long, Refusal) and too_long.status == 400
    assert "9,000 tokens" in too_long.message and "8,192 tokens" in too_long.message
    # An estimate never refuses: the backend judges.
    assert isinstance(
        choose(request_needs("/v1/chat/completions", ask), pool, 9000, False, "auto"), Choice
    )


def test_capabilities_steer_auto_and_hard_needs_refuse_a_named_model():
    pool = table_upstreams(
        state({**TWO, "s": backend("llamacpp", "small", 2048, capabilities=["completion"])})
    )
    tools = request_needs("/v1/chat/completions", {"messages": [], "tools": [{"type": "function"}]})
    choice = choose(tools, pool, 10, True, "auto")
    assert isinstance(choice, Choice) and choice.eligible == {"b"}  # vLLM serves tools
    small = [u for u in pool if u.name == "s"]
    assert isinstance(
        choose(tools, small, 10, True, "model small", auto=False), Choice
    )  # the backend judges
    embed = choose(
        request_needs("/v1/embeddings", {"input": "x"}), small, 1, True, "model small", auto=False
    )
    assert (
        isinstance(embed, Refusal)
        and "backends.s.extra_args" in embed.message
        and "--embeddings" in embed.message
    )


def test_a_remote_servers_unseen_flags_are_its_to_judge_but_images_are_not():
    remote = table_upstreams(state({"r": backend("llamacpp", "small", 2048)}))  # url: flags unseen
    embed = request_needs("/v1/embeddings", {"input": "x"})
    assert isinstance(choose(embed, remote, 1, True, "model small", auto=False), Choice)
    image = request_needs("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})  # fmt: skip
    refused = choose(image, remote, 1, True, "model small", auto=False)
    assert isinstance(refused, Refusal) and refused.code == "model_not_vision"


def test_a_corrupt_model_file_is_a_warning_not_a_hang(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(
        b"GGUF"
        + (3).to_bytes(4, "little")
        + (0).to_bytes(8, "little")
        + (2**62).to_bytes(8, "little")
    )
    assert read_metadata(bad) is None


def test_capabilities_from_the_model_file_and_the_desired_state(smollm2_path: Path):
    template = "{% if tools %}{{ tools | tojson }}{% endif %}<think>"
    assert model_capabilities({"tokenizer.chat_template": template}, None, "llamacpp") == [
        "completion", "tools", "thinking"]  # fmt: skip
    assert model_capabilities(
        {"general.architecture": "bert", "bert.pooling_type": 1}, None, "llamacpp"
    ) == ["embedding"]
    assert model_capabilities(
        {"tokenizer.chat_template": template}, ["completion"], "llamacpp"
    ) == ["completion"]
    smollm2 = read_metadata(
        smollm2_path
    )  # its template has no tools nor thinking, its vocabulary no FIM
    assert len(smollm2["tokenizer.ggml.tokens"]) == 49152
    assert model_capabilities(smollm2, None, "llamacpp") == ["completion"]
    managed = DesiredState.model_validate({
        "models": {"smollm2": {"source": f"path:{smollm2_path}"}},
        "backends": {"cpu": {"kind": "llamacpp", "model": "smollm2", "port": 1, "extra_args": ["--embeddings"]}},
    })  # fmt: skip
    caps = RoutingTable.from_state(managed).upstreams["cpu"].capabilities
    assert {
        "completion",
        "embedding",
        "tokenize",
        "responses",
        "messages",
    } <= caps and "tools" not in caps


class Capturing:
    """An OpenAI-compatible upstream that keeps each request's headers and body, answers
    with its own x-request-id, and answers 400 with an integer `code` when asked to."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, dict]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if (
            scope["method"] == "GET" and scope["path"] == "/v1/models"
        ):  # the health probe's name check
            listed = json.dumps({"object": "list", "data": [{"id": "big"}]}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": listed})
            return
        request = json.loads(body) if body else {}
        self.seen.append(({k.decode(): v.decode() for k, v in scope["headers"]}, request))
        status, answer = 200, CHAT_ANSWER
        if request.get("user") == "fail":
            status, answer = (
                400,
                {"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}},
            )
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"x-request-id", b"backend-id-1")]})  # fmt: skip
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


@pytest.fixture
def captured():
    upstream, up, port = Capturing(), free_port(), free_port()
    fleet = state({"v": backend("vllm", "big", 4096, parallel=4, port=up)})
    with serve(upstream, up), serve(create_app(fleet), port):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while (
            httpx.get(base + "/health").json()["backends_healthy"] < 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        yield base, upstream


def test_vllm_gets_its_whole_context_and_the_trace_headers(captured):
    base, upstream = captured
    sent = {
        "x-request-id": "job-1",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }
    response = httpx.post(base + "/v1/chat/completions", headers=sent, json={
        "model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000})  # fmt: skip
    assert response.status_code == 200
    headers, body = upstream.seen[-1]
    assert body["model"] == "big" and 4000 < body["max_tokens"] < 4096  # not 4096 / 4 parallel
    assert headers["x-request-id"] == "job-1" and headers["traceparent"] == sent["traceparent"]
    assert response.headers["x-request-id"] == "job-1"
    assert (
        response.headers["x-backend-request-id"] == "backend-id-1"
    )  # the backend's own id is kept
    assert response.headers["x-tensorforge-max-tokens"].startswith(
        f"{body['max_tokens']} (clamped from 100000"
    )


def test_ollama_num_predict_is_clamped_the_same_way(captured):
    base, upstream = captured
    response = httpx.post(base + "/api/chat", json={"model": "default", "stream": False, "options": {"num_predict": 10**6},
                                                    "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert response.status_code == 200 and response.json()["model"] == "big"
    assert 4000 < upstream.seen[-1][1]["max_tokens"] < 4096


def test_every_max_field_is_clamped_not_only_the_smallest(captured):
    """Found by schemathesis: max_completion_tokens 1164 beside max_tokens 2e17 went through
    whole (the smaller decided the need), and a backend that honours max_tokens would try to
    generate 2e17 tokens. Every count past the room is cut; the one that fits stays."""
    base, upstream = captured
    response = httpx.post(base + "/v1/completions", json={
        "model": "big", "prompt": "hi", "max_completion_tokens": 1164, "max_tokens": 195001334397644864})  # fmt: skip
    assert response.status_code == 200
    body = upstream.seen[-1][1]
    assert body["max_completion_tokens"] == 1164 and 4000 < body["max_tokens"] < 4096


def test_a_backends_integer_error_code_stays_an_integer(captured):
    base, _ = captured
    response = httpx.post(
        base + "/v1/chat/completions", json={"model": "big", "user": "fail", "messages": []}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == 400


def test_status_shows_the_routing_table(tmp_path, state_dir, capsys):
    import yaml

    from reconciler.cli import main

    config = tmp_path / "host.yaml"
    config.write_text(
        yaml.safe_dump(
            state(TWO, model_aliases={"local-*": "big"}).model_dump(mode="json", exclude_none=True)
        )
    )
    main(["status", "--json", "--config", str(config)])
    routing = json.loads(capsys.readouterr().out)["routing"]
    assert (
        routing["model_aliases"]["local-*"] == "big"
        and routing["model_aliases"]["current-model"] == "auto"
    )
    assert (
        routing["backends"]["s"]["context_per_request"] == 1024
        and routing["backends"]["b"]["context_per_request"] == 8192
    )
    main(["status", "--config", str(config)])
    assert "local-* -> big" in capsys.readouterr().out
