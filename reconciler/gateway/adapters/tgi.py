"""HuggingFace text-generation-inference. Chat goes to its OpenAI-compatible Messages API
(`/v1/chat/completions`) untouched; text completions go to its native `/generate` and
`/generate_stream`, whose answers and SSE events are translated to OpenAI's."""

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
from reconciler.gateway.adapters.shapes import ChunkWriter, text_completion, wants_usage
from reconciler.gateway.errors import sse_error_event
from reconciler.gateway.sse import DONE, EventParser, encode_event

FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def generate_parameters(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields -> TGI `parameters` (TGI rejects temperature 0 and top_p 1)."""
    params: dict[str, Any] = {"max_new_tokens": body.get("max_tokens") or 16, "details": True}
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and temperature > 0:
        params["temperature"] = temperature
        params["do_sample"] = True
    top_p = body.get("top_p")
    if isinstance(top_p, int | float) and 0 < top_p < 1:
        params["top_p"] = top_p
    stop = body.get("stop")
    if stop:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("seed") is not None:
        params["seed"] = body["seed"]
    # TGI's own names for llama.cpp's extra sampling fields (the Ollama surface sends these).
    for field, name in (("top_k", "top_k"), ("typical_p", "typical_p"), ("repeat_penalty", "repetition_penalty"),
                        ("frequency_penalty", "frequency_penalty")):  # fmt: skip
        if body.get(field) is not None:
            params[name] = body[field]
    return params


def prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise Unsupported("TGI backends take one text prompt per request; send one string")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise Unsupported("'prompt' must be a string")
    return prompt


class TGIAdapter(Adapter):
    protocol = "tgi"
    info_path = "/info"

    def parse_info(self, info: dict[str, Any]) -> int | None:
        limit = info.get("max_concurrent_requests")
        return limit if isinstance(limit, int) and limit > 0 else None

    def passes_through(self, endpoint: str) -> bool:
        return endpoint == "/v1/chat/completions"

    def build_request(self, exchange: Exchange, raw: bytes, served_model: str) -> UpstreamRequest:
        if exchange.endpoint == "/v1/chat/completions":
            return UpstreamRequest("POST", exchange.endpoint, raw, JSON_HEADERS)
        if exchange.endpoint != "/v1/completions":
            raise Unsupported(f"TGI backends do not serve {exchange.endpoint}")
        body = exchange.body
        native = {"inputs": prompt_text(body), "parameters": generate_parameters(body)}
        path = "/generate_stream" if body.get("stream") is True else "/generate"
        return UpstreamRequest("POST", path, json.dumps(native).encode(), JSON_HEADERS)

    def convert_response(self, exchange: Exchange, content: bytes) -> bytes:
        answer = json.loads(content)
        if isinstance(answer, list):  # some versions answer a one-element list
            answer = answer[0]
        details = answer.get("details") or {}
        prompt = len(details.get("prefill") or [])
        result = text_completion(
            exchange.requested_model, answer.get("generated_text", ""),
            FINISH.get(details.get("finish_reason", ""), "stop"), prompt,
            details.get("generated_tokens", 0),
        )  # fmt: skip
        return json.dumps(result).encode()

    async def convert_stream(
        self, exchange: Exchange, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        writer = ChunkWriter(exchange.requested_model, chat=False)
        parser = EventParser()
        async for chunk in chunks:
            out = [
                event
                for data in parser.feed(chunk)
                for event in self._events(exchange, writer, data)
            ]
            if out:
                yield b"".join(out)
        # A last event without its blank line still carries the finish, the usage and [DONE].
        out = [event for data in parser.flush() for event in self._events(exchange, writer, data)]
        if out:
            yield b"".join(out)

    @staticmethod
    def _events(exchange: Exchange, writer: ChunkWriter, data: str) -> list[bytes]:
        """The OpenAI events of one TGI event."""
        event = json.loads(data)
        if "error" in event:
            return [
                sse_error_event(
                    f"TGI: {event['error']}", event.get("error_type") or "upstream_error"
                )
            ]
        token = event.get("token") or {}
        text = "" if token.get("special") else token.get("text", "")
        details = event.get("details")
        if not details:
            return [encode_event(writer.delta(text))]
        out = [encode_event(writer.delta(text, FINISH.get(details.get("finish_reason"), "stop")))]
        if wants_usage(exchange.body):
            out.append(
                encode_event(
                    writer.usage(details.get("input_length", 0), details.get("generated_tokens", 0))
                )
            )
        out.append(DONE)
        return out
