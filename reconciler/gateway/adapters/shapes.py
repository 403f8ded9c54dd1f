"""OpenAI's response shapes, built by the adapters of backends that do not speak OpenAI."""

from __future__ import annotations

import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_completion(
    model: str, text: str, finish: str | None, prompt: int, completion: int
) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt, completion),
    }


def text_completion(
    model: str, text: str, finish: str | None, prompt: int, completion: int
) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt, completion),
    }


class ChunkWriter:
    """Builds the chunks of one OpenAI stream (chat or text), sharing id and timestamp."""

    def __init__(self, model: str, chat: bool):
        self.model = model
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self._role_sent = False

    def _chunk(
        self, choices: list[dict[str, Any]], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **(extra or {})}  # fmt: skip

    def delta(self, text: str, finish: str | None = None) -> dict[str, Any]:
        if not self.chat:
            return self._chunk(
                [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
            )
        delta: dict[str, Any] = {"content": text} if text or not finish else {}
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        return self._chunk(
            [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        )

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return self._chunk([], {"usage": usage(prompt, completion)})


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
