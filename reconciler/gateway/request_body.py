"""Reading and checking a request body before it is routed: the size and time limits, JSON,
and the fields the gateway and its adapters read (everything else is the backend's to judge).
Below every surface: the OpenAI, Ollama and WebSocket surfaces check requests alike."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from reconciler.gateway.asgi import Receive

# Routed by `model` like chat; each goes only to a backend kind that serves it.
PASS_THROUGH = (
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    "/rerank",
    "/tokenize",
    "/detokenize",
    "/infill",
)
OPENAI_ENDPOINTS = frozenset(
    ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", *PASS_THROUGH)
)


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client went away while sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(raw: bytes) -> dict[str, Any] | tuple[str, str]:
    """The request as a dict, or (what is wrong with it, error code)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"request body is not valid JSON: {exc}", "invalid_json"
    except RecursionError:  # [[[[…]]]] deeper than the parser goes: still the client's 400
        return "request body is nested too deeply", "invalid_json"
    if not isinstance(body, dict):
        return "request body must be a JSON object", "invalid_request"
    return body


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _strings(value: object, allow_tokens: bool = False) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    for item in value:
        if isinstance(item, str):
            continue
        if not allow_tokens:
            return False
        tokens = item if isinstance(item, list) else [item]  # token ids, or lists of them
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return False
    return True


def _image_ok(part: dict[str, Any]) -> bool:
    if "image_url" not in part:
        return True
    image = part["image_url"]
    return isinstance(image, dict) and isinstance(image.get("url"), str)


def check_fields(endpoint: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """(what is wrong, error code) for the fields the gateway or an adapter reads, else None.
    Everything else is the backend's to judge. A max_tokens larger than the context is not
    wrong: routing clamps it to what fits (selection.py)."""
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be true or false", "invalid_request"
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if value is not None and not _is_count(value):
            return f"'{field}' must be a positive integer", "invalid_max_tokens"
    if "n" in body and body["n"] is not None and not _is_count(body["n"]):
        return "'n' must be a positive integer", "invalid_request"
    # Read by the Ollama and TGI adapters, which translate them.
    if body.get("response_format") is not None and not isinstance(body["response_format"], dict):
        return "'response_format' must be an object", "invalid_request"
    if body.get("stop") is not None and not _strings(body["stop"]):
        return "'stop' must be a string or a list of strings", "invalid_request"
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):  # an empty list is the backend's to judge
            return "'messages' must be a list of messages", "invalid_messages"
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return "each message must be an object with a string 'role'", "invalid_messages"
            content = message.get("content")
            parts_ok = isinstance(content, list) and all(isinstance(p, dict) for p in content)
            if content is not None and not isinstance(content, str) and not parts_ok:
                return (
                    "a message's 'content' must be a string, a list of parts or null",
                    "invalid_messages",
                )
            if parts_ok and not all(_image_ok(p) for p in content or ()):
                return (
                    "a content part's 'image_url' must be an object with a string 'url'",
                    "invalid_messages",
                )
    elif endpoint == "/v1/completions":
        if not _strings(body.get("prompt"), allow_tokens=True):
            return "'prompt' must be a string or a list of strings", "invalid_prompt"
    elif endpoint == "/v1/embeddings":
        if not _strings(body.get("input"), allow_tokens=True):
            return "'input' must be a string or a list of strings", "invalid_input"
    return None
