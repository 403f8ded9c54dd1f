"""Ollama's `context` for `/api/generate`: an opaque list of integers a client hands back to
continue a conversation. Ollama fills it with token ids; TensorForge fills it with the UTF-8
bytes of the conversation's messages (JSON), which any backend can continue from as chat
history, with no extra call to tokenize. Clients only store and return it."""

from __future__ import annotations

import json
from typing import Any

from reconciler.gateway.ollama.options import Refused

ROLES = frozenset(("user", "assistant"))


def encode_context(messages: list[dict[str, Any]]) -> list[int]:
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return list(json.dumps(turns, separators=(",", ":"), ensure_ascii=False).encode())


def decode_context(context: object) -> list[dict[str, Any]]:
    """The conversation a `context` from this gateway holds; Refused for anything else (a
    context made by an Ollama server holds token ids of its own model, unreadable here)."""
    refused = Refused(
        "'context' is not one this gateway returned (Ollama's own holds token ids TensorForge "
        "cannot read); send the conversation as /api/chat messages or drop 'context'"
    )
    if not isinstance(context, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in context
    ):
        raise refused
    try:
        turns = json.loads(bytes(context).decode())
    except (ValueError, UnicodeDecodeError):
        raise refused from None
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)
        for t in turns
    ):
        raise refused
    return turns
