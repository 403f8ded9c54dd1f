"""`tensorforge run`: send prompts through the gateway and record answers with timings.

Streams each answer so that time to first token is measured where the user feels it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSONL with a "prompt" field per line. Lines end at `\n` (and
    `\r\n`) only: a form feed or U+2028 inside a prompt or a JSON string stays in it."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not a prompt
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: expected a JSON object with 'prompt': {exc}") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{number}: 'prompt' must be a non-empty string")
            prompts.append(prompt)
        else:
            prompts.append(line)
    return prompts


def ask(
    client: httpx.Client, gateway: str, model: str, prompt: str, max_tokens: int, headers: dict
) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first_token = None
    parts: list[str] = []
    usage: dict = {}
    finish = None
    served_model = model
    backend = None
    error = None
    try:
        with client.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=headers) as resp:
            backend = resp.headers.get("x-tensorforge-backend")
            if resp.status_code != 200:
                resp.read()
                try:
                    error = resp.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    error = resp.text[:500]
            else:
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"].get("message", str(event["error"]))
                        break
                    served_model = event.get("model", served_model)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first_token is None:
                                first_token = time.perf_counter()
                            parts.append(text)
                        finish = choice.get("finish_reason") or finish
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        # One prompt's broken connection or malformed event is that result's error; the
        # other prompts' answers are kept.
        error = f"{type(exc).__name__}: {exc}"
    total = time.perf_counter() - started
    completion_tokens = usage.get("completion_tokens") or 0
    decode_time = total - ((first_token or started) - started)
    return {
        "prompt": prompt,
        "answer": "".join(parts),
        "model": served_model,
        "backend": backend,
        "finish_reason": finish,
        "usage": usage,
        "timings": {
            "total_s": round(total, 4),
            "time_to_first_token_s": round(first_token - started, 4) if first_token else None,
            "tokens_per_s": round(completion_tokens / decode_time, 2) if decode_time > 0 and completion_tokens else None,
        },
        "error": error,
    }


def run_prompts(
    gateway: str,
    model: str,
    prompts: Iterable[str],
    max_tokens: int = 256,
    parallel: int = 8,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> list[dict]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = list(prompts)
    with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(lambda p: ask(client, gateway, model, p, max_tokens, headers), prompts))
