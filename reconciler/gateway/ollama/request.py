"""An Ollama `/api/chat` or `/api/generate` request, checked field by field and turned into
the request a backend understands: OpenAI's chat or text completion (with llama.cpp's extra
sampling fields), or llama.cpp's `/infill` for fill-in-the-middle. Every documented field is
mapped or refused with `Refused` naming it; none is dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from reconciler.gateway.ollama.context import decode_context
from reconciler.gateway.ollama.options import Refused, check_protocols, sampling_fields

ROLES = frozenset(("system", "user", "assistant", "tool"))
THINK_LEVELS = frozenset(("low", "medium", "high"))
# Image types by the first bytes of their base64 text; Ollama accepts any, OpenAI wants a MIME type.
IMAGE_TYPES = {
    "iVBOR": "image/png",
    "/9j/": "image/jpeg",
    "R0lGOD": "image/gif",
    "UklGR": "image/webp",
}


@dataclass(frozen=True)
class Translated:
    endpoint: str  # the gateway endpoint the backend request goes through
    body: dict[str, Any]
    num_ctx: int | None  # what the client asked for, if anything
    conversation: list[dict[str, Any]] | None = (
        None  # generate's turns so far, for the `context` it returns
    )


def _type(native: dict[str, Any], field: str, kind: type, what: str) -> None:
    value = native.get(field)
    if value is None:
        return
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise Refused(f"'{field}' must be {what}")


def is_unload(keep_alive: object) -> bool:
    return keep_alive in (0, "0", "0s", "0m", "0h") or keep_alive == 0.0


def check_keep_alive(native: dict[str, Any]) -> None:
    """Any duration is honoured (a declared model stays loaded longer than any keep_alive),
    except 0, which asks Ollama to unload: a declared backend is not unloaded by a request."""
    keep_alive = native.get("keep_alive")
    if keep_alive is None:
        return
    if isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float):
        raise Refused("'keep_alive' must be a duration such as \"5m\" or a number of seconds")
    if is_unload(keep_alive):
        raise Refused(
            "'keep_alive' 0 asks to unload the model; TensorForge keeps declared models loaded: "
            "remove its backend from the desired state to unload it"
        )


def image_url(data: object) -> dict[str, Any]:
    if not isinstance(data, str) or not data:
        raise Refused("each of 'images' must be a base64-encoded image string")
    mime = next((m for prefix, m in IMAGE_TYPES.items() if data.startswith(prefix)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _arguments(call: dict[str, Any]) -> str:
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        return arguments  # some clients send the JSON text already
    if not isinstance(arguments, dict):
        raise Refused("a tool call's 'function.arguments' must be an object")
    return json.dumps(arguments)


def openai_messages(messages: object) -> list[dict[str, Any]]:
    """Ollama messages -> OpenAI's: images become content parts, tool calls get ids (Ollama
    has none) and each `tool` answer is tied to the call it answers, by `tool_name` or order."""
    if not isinstance(messages, list):
        raise Refused("'messages' must be a list of messages")
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, function name) of calls without an answer yet
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise Refused(
                f"messages[{i}] must be an object whose 'role' is system, user, assistant or tool"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise Refused(f"messages[{i}].content must be a string")
        converted: dict[str, Any] = {"role": message["role"], "content": content or ""}
        images = message.get("images") or []
        if not isinstance(images, list):
            raise Refused(f"messages[{i}].images must be a list of base64 strings")
        if images:
            converted["content"] = [
                {"type": "text", "text": content or ""},
                *map(image_url, images),
            ]
        thinking = message.get("thinking")
        if thinking:
            if not isinstance(thinking, str):
                raise Refused(f"messages[{i}].thinking must be a string")
            converted["reasoning_content"] = thinking
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise Refused(f"messages[{i}].tool_calls must be a list")
        if calls:
            converted["tool_calls"] = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise Refused(
                        f'messages[{i}].tool_calls[{j}] must be {{"function": {{"name", "arguments"}}}}'
                    )
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
                converted["tool_calls"].append({"id": call_id, "type": "function",
                                                "function": {"name": function["name"], "arguments": _arguments(function)}})  # fmt: skip
                unanswered.append((call_id, function["name"]))
        if message["role"] == "tool":
            name = message.get("tool_name") or message.get("name")
            match = next(
                (c for c in unanswered if c[1] == name), unanswered[0] if unanswered else None
            )
            if match is not None:
                unanswered.remove(match)
                converted["tool_call_id"] = match[0]
            if isinstance(name, str):
                converted["name"] = name
        out.append(converted)
    return out


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise Refused("'tools' must be a list of tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Refused(f'tools[{i}] must be {{"type": "function", "function": {{"name", ...}}}}')
    return [{"type": "function", **{k: v for k, v in t.items() if k != "type"}} for t in tools]


def _logprobs(native: dict[str, Any], chat_family: bool) -> dict[str, Any]:
    """Ollama's `logprobs`/`top_logprobs` are OpenAI's chat fields (raw and suffix requests
    have no chat answer to carry them)."""
    _type(native, "logprobs", bool, "true or false")
    _type(native, "top_logprobs", int, "a whole number from 0 to 20")
    top = native.get("top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise Refused("'top_logprobs' must be a whole number from 0 to 20")
    if not native.get("logprobs"):
        if top:
            raise Refused("'top_logprobs' needs 'logprobs': true")
        return {}
    if not chat_family:
        raise Refused(
            "'logprobs' is not available with raw or suffix requests; send it without them"
        )
    return {"logprobs": True, **({"top_logprobs": top} if top else {})}


def _format(fmt: object) -> dict[str, Any] | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}
    raise Refused("'format' must be \"json\" or a JSON schema object")


def _think(think: object) -> dict[str, Any]:
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if think in THINK_LEVELS:
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": think}
    raise Refused('\'think\' must be true, false, "low", "medium" or "high"')


# Newer Ollama request fields with no mapping here yet: refused, not ignored.
NOT_MAPPED = ("width", "height", "steps")  # image generation: no backend here makes images


def translate(native: dict[str, Any], chat: bool, protocols: set[str]) -> Translated:
    """The backend request for an Ollama request whose model is served by `protocols`
    (anything but Ollama itself, which takes the request as it is)."""
    for field in NOT_MAPPED:
        if native.get(field):
            raise Refused(f"'{field}' is not supported by TensorForge's Ollama surface; remove it")
    _type(native, "stream", bool, "true or false")
    check_keep_alive(native)
    fields, num_ctx = sampling_fields(native.get("options"))
    fields.update(
        _logprobs(native, chat_family=chat or not (native.get("raw") or native.get("suffix")))
    )
    body: dict[str, Any] = {
        "model": native["model"],
        "stream": native.get("stream", True) is not False,
        **fields,
    }
    if (fmt := _format(native.get("format"))) is not None:
        body["response_format"] = fmt
    if chat:
        body["messages"] = openai_messages(native.get("messages") or [])
        if native.get("tools"):
            body["tools"] = _tools(native["tools"])
        body.update(_think(native.get("think")))
        return _finish(body, "/v1/chat/completions", "chat", protocols, num_ctx)
    for field in ("prompt", "suffix", "system", "template"):
        _type(native, field, str, "a string")
    _type(native, "raw", bool, "true or false")
    if native.get("template"):
        raise Refused(
            "'template' (an Ollama Go template) cannot be applied here: the backend uses the model's "
            "own chat template; send raw: true with a prompt you templated yourself instead"
        )
    if native.get("context") and (native.get("raw") or native.get("suffix")):
        raise Refused("'context' continues a templated conversation: send it without raw or suffix")
    if native.get("tools"):
        raise Refused("'tools' is an /api/chat field; send tools with /api/chat")
    images = native.get("images") or []
    if not isinstance(images, list):
        raise Refused("'images' must be a list of base64 strings")
    prompt = native.get("prompt") or ""
    if native.get("suffix"):
        return _infill(native, body, protocols, num_ctx)
    if native.get("raw"):
        if images:
            raise Refused("'images' need the chat template: send them without raw: true")
        if native.get("think") is not None:
            raise Refused("'think' needs the chat template: send it without raw: true")
        body["prompt"] = prompt
        return _finish(body, "/v1/completions", "text", protocols, num_ctx)
    # Ollama applies the model's template unless raw: a chat turn does the same here, after
    # the turns an earlier answer's `context` holds.
    history = decode_context(native["context"]) if native.get("context") else []
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if images:
        user["content"] = [{"type": "text", "text": prompt}, *map(image_url, images)]
    body["messages"] = (
        [{"role": "system", "content": native["system"]}] if native.get("system") else []
    )
    body["messages"] += [*history, user]
    body.update(_think(native.get("think")))
    translated = _finish(body, "/v1/chat/completions", "chat", protocols, num_ctx)
    return replace(translated, conversation=[*history, {"role": "user", "content": prompt}])


def _finish(
    body: dict[str, Any], endpoint: str, family: str, protocols: set[str], num_ctx: int | None
) -> Translated:
    if body["stream"] and endpoint != "/infill":
        body["stream_options"] = {"include_usage": True}
    check_protocols(body, protocols, family)
    return Translated(endpoint, body, num_ctx)


def _infill(
    native: dict[str, Any], body: dict[str, Any], protocols: set[str], num_ctx: int | None
) -> Translated:
    """`suffix` is fill-in-the-middle: llama.cpp's /infill takes the text before and after."""
    others = sorted(protocols - {"llamacpp"})
    if others:
        raise Refused(
            f"'suffix' (fill-in-the-middle) is served by llama.cpp and Ollama backends only; this model "
            f"also runs on {', '.join(others)}: drop 'suffix' or route the model to llama.cpp"
        )
    if native.get("images") or native.get("raw") or native.get("system") or native.get("format"):
        raise Refused(
            "'suffix' (fill-in-the-middle) cannot be combined with images, raw, system or format"
        )
    infill = {k: v for k, v in body.items() if k not in ("max_tokens", "response_format")}
    infill.update(input_prefix=native.get("prompt") or "", input_suffix=native["suffix"], prompt="")
    if "max_tokens" in body:
        infill["n_predict"] = body["max_tokens"]
    check_protocols(infill, protocols, "text")
    return Translated("/infill", infill, num_ctx)


def embed_body(
    native: dict[str, Any], name: str, texts: list[str], protocols: set[str]
) -> dict[str, Any]:
    """OpenAI's embeddings request for Ollama's; Refused for what the backends cannot take.
    `truncate` is accepted: an input longer than the context is the backend's 400 either way."""
    check_keep_alive(native)
    fields, _ = sampling_fields(native.get("options"))
    if fields:
        raise Refused(
            f"options {', '.join(sorted(fields))} have no effect on embeddings; remove them"
        )
    if native.get("truncate") is not None and not isinstance(native["truncate"], bool):
        raise Refused("'truncate' must be true or false")
    body: dict[str, Any] = {"model": name, "input": texts}
    dimensions = native.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise Refused("'dimensions' must be a positive whole number")
        if not protocols <= {"vllm", "openai"}:
            raise Refused(
                "'dimensions' is served by vLLM and OpenAI-compatible backends only; remove it"
            )
        body["dimensions"] = dimensions
    return body
