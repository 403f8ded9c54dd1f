"""Ollama's native API: chat -> `/api/chat`, text completions -> `/api/generate` (raw),
embeddings -> `/api/embed`; its NDJSON streams become OpenAI SSE chunks. Liveness is
`HEAD /`; Ollama has no Prometheus endpoint, so it reports no load, but `/api/ps` says which
models it holds in memory: routing prefers a replica that need not load the model first."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from reconciler.gateway.adapters.base import (
    JSON_HEADERS,
    Adapter,
    Exchange,
    Unsupported,
    UpstreamRequest,
)
from reconciler.gateway.adapters.shapes import (
    ChunkWriter,
    chat_completion,
    text_completion,
    usage,
    wants_usage,
)
from reconciler.gateway.errors import sse_error_event
from reconciler.gateway.sse import DONE, LineParser, encode_event

PATHS = {
    "/v1/chat/completions": "/api/chat",
    "/v1/completions": "/api/generate",
    "/v1/embeddings": "/api/embed",
}
# OpenAI sampling field (and llama.cpp's extra ones, which OpenAI clients send too) -> Ollama option.
OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict", "seed": "seed", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta", "n_keep": "num_keep",
}  # fmt: skip


def _arguments(text: object) -> dict[str, Any]:
    """OpenAI's arguments (JSON text) -> Ollama's (an object)."""
    if isinstance(text, dict):
        return text
    try:
        parsed = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        raise Unsupported(
            "a tool call's 'function.arguments' must be JSON text of an object"
        ) from None
    if not isinstance(parsed, dict):
        raise Unsupported("a tool call's 'function.arguments' must be JSON text of an object")
    return parsed


def ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI content parts (text, data-URL images) -> Ollama's content + images; tool calls
    with their arguments as objects, and each tool answer named by the call it answers."""
    out = []
    names: dict[str, str] = {}  # tool call id -> function name
    for message in messages:
        content = message.get("content")
        converted = {"role": message.get("role", "user"), "content": content or ""}
        if isinstance(content, list):
            converted["content"] = "".join(
                p.get("text", "") for p in content if p.get("type") == "text"
            )
            images = [
                p["image_url"]["url"].partition("base64,")[2]
                for p in content
                if p.get("type") == "image_url"
                and "base64," in p.get("image_url", {}).get("url", "")
            ]
            if images:
                converted["images"] = images
        if message.get("reasoning_content"):
            converted["thinking"] = message["reasoning_content"]
        calls = message.get("tool_calls") or []
        if calls:
            converted["tool_calls"] = []
            for call in calls:
                function = call.get("function") or {}
                converted["tool_calls"].append(
                    {
                        "function": {
                            "name": function.get("name", ""),
                            "arguments": _arguments(function.get("arguments")),
                        }
                    }
                )
                names[str(call.get("id"))] = function.get("name", "")
        if message.get("role") == "tool" and str(message.get("tool_call_id")) in names:
            converted["tool_name"] = names[str(message["tool_call_id"])]
        out.append(converted)
    return out


def openai_tool_calls(calls: list[Any]) -> list[dict[str, Any]]:
    """Ollama's tool calls -> OpenAI's (ids made up: Ollama's may have none)."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments", {})
        out.append({
            "id": call.get("id") or f"call_{index}", "type": "function",
            "function": {"name": function.get("name", ""),
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
        })  # fmt: skip
    return out


def native_body(exchange: Exchange, served_model: str) -> dict[str, Any]:
    body = exchange.body
    native: dict[str, Any] = {"model": served_model, "stream": body.get("stream") is True}
    if exchange.endpoint == "/v1/embeddings":
        return {"model": served_model, "input": body.get("input", "")}
    options = {OPTIONS[k]: v for k, v in body.items() if k in OPTIONS and v is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    if options:
        native["options"] = options
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        native["format"] = "json"
    elif fmt.get("type") == "json_schema":
        native["format"] = (fmt.get("json_schema") or {}).get("schema", "json")
    if exchange.endpoint == "/v1/chat/completions":
        native["messages"] = ollama_messages(body.get("messages") or [])
        if body.get("tools"):
            native["tools"] = body["tools"]  # OpenAI's tool format is Ollama's
        thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
        if isinstance(thinking, bool):
            native["think"] = thinking
        if body.get("reasoning_effort") in ("low", "medium", "high"):
            native["think"] = body["reasoning_effort"]
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise Unsupported("Ollama backends take one prompt per request; send one string")
            prompt = prompt[0]
        native["prompt"] = prompt
        native["raw"] = True  # an OpenAI completion is plain text continuation, no template
    return native


def finish_reason(answer: dict[str, Any]) -> str:
    return "length" if answer.get("done_reason") == "length" else "stop"


def tagged(name: str) -> str:
    """Ollama's full model name: `llama3.2` is `llama3.2:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


class OllamaAdapter(Adapter):
    protocol = "ollama"
    loaded_path = "/api/ps"
    stream_usage_option = True  # its converted stream ends with usage when asked

    def holds_model(self, document: dict[str, Any], served_model: str) -> bool | None:
        models = document.get("models") if isinstance(document, dict) else None
        if not isinstance(models, list):
            return None
        wanted = tagged(served_model)
        return any(
            isinstance(m, dict)
            and wanted in (tagged(str(m.get("model", ""))), tagged(str(m.get("name", ""))))
            for m in models
        )

    def passes_through(self, endpoint: str) -> bool:
        return endpoint.startswith("/api/")  # the gateway's own Ollama surface, native both ways

    def build_request(self, exchange: Exchange, raw: bytes, served_model: str) -> UpstreamRequest:
        if exchange.endpoint.startswith("/api/"):
            content = json.dumps({**exchange.body, "model": served_model}).encode()
            return UpstreamRequest("POST", exchange.endpoint, content, JSON_HEADERS)
        path = PATHS.get(exchange.endpoint)
        if path is None:
            raise Unsupported(f"Ollama backends do not serve {exchange.endpoint}")
        content = json.dumps(native_body(exchange, served_model)).encode()
        return UpstreamRequest("POST", path, content, JSON_HEADERS)

    def convert_response(self, exchange: Exchange, content: bytes) -> bytes:
        answer = json.loads(content)
        model = exchange.requested_model
        prompt, completion = answer.get("prompt_eval_count", 0), answer.get("eval_count", 0)
        if exchange.endpoint == "/v1/embeddings":
            data = [{"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(answer.get("embeddings", []))]  # fmt: skip
            counted = usage(prompt, 0)
            counted.pop("completion_tokens")
            result: dict[str, Any] = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": counted,
            }
        elif exchange.endpoint == "/v1/chat/completions":
            message = answer.get("message") or {}
            calls = message.get("tool_calls")
            finish = "tool_calls" if calls else finish_reason(answer)
            result = chat_completion(model, message.get("content", ""), finish, prompt, completion)
            if calls:
                result["choices"][0]["message"]["tool_calls"] = openai_tool_calls(calls)
            if message.get("thinking"):
                result["choices"][0]["message"]["reasoning_content"] = message["thinking"]
        else:
            result = text_completion(
                model, answer.get("response", ""), finish_reason(answer), prompt, completion
            )
        return json.dumps(result).encode()

    async def convert_stream(
        self, exchange: Exchange, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        chat = exchange.endpoint == "/v1/chat/completions"
        writer = ChunkWriter(exchange.requested_model, chat=chat)
        parser = LineParser()
        calls: list[
            Any
        ] = []  # tool calls sent so far: they number the next ones and set the finish
        async for chunk in chunks:
            out = [
                event
                for line in parser.feed(chunk)
                for event in self._events(exchange, writer, line, calls)
            ]
            if out:
                yield b"".join(out)
        # A last line without its newline still carries the finish, the usage and [DONE].
        out = [
            event
            for line in parser.flush()
            for event in self._events(exchange, writer, line, calls)
        ]
        if out:
            yield b"".join(out)

    @staticmethod
    def _events(
        exchange: Exchange, writer: ChunkWriter, line: dict[str, Any], calls: list[Any]
    ) -> list[bytes]:
        """The SSE events of one NDJSON line."""
        if "error" in line:
            return [sse_error_event(f"Ollama: {line['error']}")]
        message = line.get("message") or {}
        text = message.get("content", "") if writer.chat else line.get("response", "")
        out = []
        if writer.chat and (message.get("tool_calls") or message.get("thinking")):
            chunk = writer.delta("")
            delta = chunk["choices"][0]["delta"]
            delta.pop("content", None)
            if message.get("thinking"):
                delta["reasoning_content"] = message["thinking"]
            if message.get("tool_calls"):
                new = openai_tool_calls(message["tool_calls"])
                delta["tool_calls"] = [
                    {"index": len(calls) + i, **call} for i, call in enumerate(new)
                ]
                calls.extend(new)
            out.append(encode_event(chunk))
        if line.get("done"):
            out.append(
                encode_event(writer.delta(text, "tool_calls" if calls else finish_reason(line)))
            )
            if wants_usage(exchange.body):
                out.append(
                    encode_event(
                        writer.usage(line.get("prompt_eval_count", 0), line.get("eval_count", 0))
                    )
                )
            out.append(DONE)
            return out
        return [*out, encode_event(writer.delta(text))] if text else out
