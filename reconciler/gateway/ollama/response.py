"""Backend answers (OpenAI's, and llama.cpp's native `/infill`) in Ollama's shapes: the text,
`thinking`, `tool_calls` with their arguments as objects, `done_reason`, token counts and
durations in nanoseconds (llama.cpp's own `timings` where the backend sends them)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from reconciler.gateway.ollama.context import encode_context
from reconciler.gateway.sse import iter_events

# llama.cpp's /infill says why it stopped in `stop_type`.
INFILL_DONE = {"limit": "length", "eos": "stop", "word": "stop"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def ollama_tool_calls(calls: list[Any] | None) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as JSON text) -> Ollama's (arguments as an object)."""
    out = []
    for index, call in enumerate(calls or []):
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = {
                "_raw": arguments
            }  # the model wrote something that is not JSON: keep it visible
        entry = {
            "function": {"index": index, "name": function.get("name", ""), "arguments": parsed}
        }
        if call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def ollama_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """OpenAI's `logprobs.content` -> Ollama's `logprobs` (token, logprob, top_logprobs)."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [
        {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0),
         **({"top_logprobs": [{"token": x.get("token", ""), "logprob": x.get("logprob", 0.0)}
                              for x in t["top_logprobs"]]} if t.get("top_logprobs") else {})}
        for t in content
    ]  # fmt: skip


def ollama_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("reasoning_content"):
        out["thinking"] = message["reasoning_content"]
    if message.get("tool_calls"):
        out["tool_calls"] = ollama_tool_calls(message["tool_calls"])
    return out


class Stats:
    """Counts and durations for the final object, from the backend's usage and timings."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.finish: str | None = None

    def seen_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def take(self, document: dict[str, Any]) -> None:
        if isinstance(document.get("usage"), dict):
            self.usage = document["usage"]
        if isinstance(document.get("timings"), dict):
            self.timings = document["timings"]

    def final(self) -> dict[str, Any]:
        total = int((time.perf_counter() - self.started) * 1e9)
        t = self.timings
        prompt_count = self.usage.get("prompt_tokens", t.get("prompt_n", 0))
        eval_count = self.usage.get("completion_tokens", t.get("predicted_n", 0))
        if "prompt_ms" in t and "predicted_ms" in t:  # the backend measured its own work
            prompt_ns, eval_ns = int(t["prompt_ms"] * 1e6), int(t["predicted_ms"] * 1e6)
        else:  # measured here: up to the first token, then the rest
            first = self.first_token or time.perf_counter()
            prompt_ns = int((first - self.started) * 1e9)
            eval_ns = max(total - prompt_ns, 0)
        return {
            "done": True, "done_reason": "length" if self.finish == "length" else "stop",
            "total_duration": total, "load_duration": 0,  # declared models are loaded already
            "prompt_eval_count": prompt_count, "prompt_eval_duration": prompt_ns,
            "eval_count": eval_count, "eval_duration": eval_ns,
        }  # fmt: skip


def whole_answer(
    result: dict[str, Any],
    model: str,
    chat: bool,
    stats: Stats,
    conversation: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A non-streamed OpenAI answer (chat or text) as Ollama's single object."""
    stats.take(result)
    choice = (result.get("choices") or [{}])[0]
    stats.finish = choice.get("finish_reason")
    out: dict[str, Any] = {"model": model, "created_at": now_iso()}
    if chat:
        out["message"] = ollama_message(choice.get("message") or {})
    else:
        message = choice.get("message")
        out["response"] = (message or {}).get("content") or choice.get("text") or ""
        if message and message.get("reasoning_content"):
            out["thinking"] = message["reasoning_content"]
    if (logprobs := ollama_logprobs(choice)) is not None:
        out["logprobs"] = logprobs
    if conversation is not None:
        out["context"] = encode_context(
            [*conversation, {"role": "assistant", "content": out["response"]}]
        )
    return {**out, **stats.final()}


def infill_answer(result: dict[str, Any], model: str, stats: Stats) -> dict[str, Any]:
    """llama.cpp's native /infill answer as Ollama's generate object."""
    _infill_stats(result, stats)
    return {
        "model": model,
        "created_at": now_iso(),
        "response": result.get("content", ""),
        **stats.final(),
    }


def _infill_stats(event: dict[str, Any], stats: Stats) -> None:
    stats.take(event)
    stats.finish = INFILL_DONE.get(event.get("stop_type", ""), "stop")
    stats.usage = {
        "prompt_tokens": event.get("tokens_evaluated", 0),
        "completion_tokens": event.get("tokens_predicted", 0),
    }


class StreamTranslator:
    """OpenAI stream events (or llama.cpp /infill events) -> Ollama NDJSON objects. Tool
    calls arrive in fragments; Ollama sends each call whole, so they are gathered and sent
    together when the backend finishes."""

    def __init__(
        self,
        model: str,
        chat: bool,
        infill: bool = False,
        conversation: list[dict[str, Any]] | None = None,
    ):
        self.model = model
        self.chat = chat
        self.infill = infill
        self.conversation = conversation  # generate: the turns its final `context` continues
        self.text: list[str] = []
        self.stats = Stats()
        self.calls: dict[int, dict[str, Any]] = {}

    def _piece(
        self, text: str = "", thinking: str = "", calls: list[Any] | None = None
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            return {"model": self.model, "created_at": now_iso(), "message": message, "done": False}
        out = {"model": self.model, "created_at": now_iso(), "response": text, "done": False}
        if thinking:
            out["thinking"] = thinking
        return out

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self.infill:
            return self._feed_infill(event)
        self.stats.take(event)
        out = []
        for choice in event.get("choices") or []:
            self.stats.finish = choice.get("finish_reason") or self.stats.finish
            delta = choice.get("delta") or {}
            text = delta.get("content") or choice.get("text") or ""
            thinking = delta.get("reasoning_content") or ""
            for fragment in delta.get("tool_calls") or []:
                self._gather(fragment)
            if text or thinking:
                self.stats.seen_token()
                self.text.append(text)
                piece = self._piece(text, thinking)
                if (logprobs := ollama_logprobs(choice)) is not None:
                    piece["logprobs"] = logprobs
                out.append(piece)
        return out

    def _feed_infill(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        if event.get("content"):
            self.stats.seen_token()
            out.append(self._piece(event["content"]))
        if event.get("stop"):
            _infill_stats(event, self.stats)
        return out

    def _gather(self, fragment: dict[str, Any]) -> None:
        call = self.calls.setdefault(
            fragment.get("index", 0), {"function": {"name": "", "arguments": ""}}
        )
        if fragment.get("id"):
            call["id"] = fragment["id"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def finish(self) -> list[dict[str, Any]]:
        """The gathered tool calls (if any) and the final object."""
        out = []
        if self.calls:
            calls = [self.calls[i] for i in sorted(self.calls)]
            out.append(self._piece(calls=ollama_tool_calls(calls)))
        last = self._piece()
        last.update(self.stats.final())
        if self.conversation is not None:
            reply = {"role": "assistant", "content": "".join(self.text)}
            last["context"] = encode_context([*self.conversation, reply])
        out.append(last)
        return out


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def ndjson_lines(
    stream: AsyncGenerator[bytes, None], translator: StreamTranslator, done: Callable[[], None]
) -> AsyncIterator[bytes]:
    """A backend's stream as Ollama NDJSON lines; `done` runs when it ends or is closed.
    The first step yields nothing: run it once so that closing always cleans up."""
    try:
        yield b""
        async for event in iter_events(stream):
            if "error" in event:
                error = event["error"]
                message = (
                    error.get("message", "backend failed")
                    if isinstance(error, dict)
                    else str(error)
                )
                yield _line({"error": message})
                return
            for piece in translator.feed(event):
                yield _line(piece)
            if translator.infill and event.get("stop"):
                break  # llama.cpp's native stream has no [DONE]
        for piece in translator.finish():
            yield _line(piece)
    finally:
        await stream.aclose()
        done()


async def relay_lines(
    stream: AsyncGenerator[bytes, None], done: Callable[[], None]
) -> AsyncIterator[bytes]:
    """An Ollama backend's NDJSON, byte for byte (primed like `ndjson_lines`)."""
    try:
        yield b""
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()
        done()
