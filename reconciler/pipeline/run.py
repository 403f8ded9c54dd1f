"""`tensorforge run`: send prompts through the gateway and record answers with timings.

Streams each answer so that time to first token is measured where the user feels it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm


@dataclass(frozen=True)
class Sampling:
    """How `run` asks: a low temperature by default (0.1, as the earlier scripts had), so a
    batch job's answers are reproducible; the backend's own default (0.8 in llama.cpp) made
    the README's example answer nonsense."""

    temperature: float = 0.1
    top_p: float | None = None
    seed: int | None = None
    system: str | None = None

    def fields(self) -> dict:
        out: dict = {"temperature": self.temperature}
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def messages(self, prompt: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": prompt}]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSONL with a "prompt" field per line. Lines end at `\n` (and
    `\r\n`) only: a form feed or U+2028 inside a prompt or a JSON string stays in it."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not a prompt
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    prompts = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with 'prompt': {exc}"
                ) from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{number}: 'prompt' must be a non-empty string")
            prompts.append(prompt)
        else:
            prompts.append(line)
    return prompts


def read_prompt_file(path: Path) -> str:
    """A whole file as one prompt (`--file`, and each `*.txt` of `--batch`)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the prompt file: {exc.strerror}") from None
    if not text.strip():
        raise ValueError(f"{path}: the prompt file is empty")
    return text.strip()


def ask(
    client: httpx.Client, gateway: str, model: str, prompt: str, max_tokens: int, headers: dict,
    sampling: Sampling | None = None,
) -> dict:  # fmt: skip
    body = {
        "model": model,
        "messages": sampling.messages(prompt)
        if sampling
        else [{"role": "user", "content": prompt}],
        **(sampling.fields() if sampling else {}),
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
        with client.stream(
            "POST", f"{gateway}/v1/chat/completions", json=body, headers=headers
        ) as resp:
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
            "tokens_per_s": round(completion_tokens / decode_time, 2)
            if decode_time > 0 and completion_tokens
            else None,
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
    sampling: Sampling | None = None,
) -> list[dict]:
    """Answers in the prompts' order; with more than one prompt, a progress bar on stderr."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = list(prompts)
    results: list[dict | None] = [None] * len(prompts)
    bar = tqdm(
        total=len(prompts),
        unit="prompt",
        file=sys.stderr,
        disable=len(prompts) < 2,
        dynamic_ncols=True,
    )
    with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(max(1, parallel)) as pool, bar:
        futures = {
            pool.submit(ask, client, gateway, model, prompt, max_tokens, headers, sampling): index
            for index, prompt in enumerate(prompts)
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    return [r for r in results if r is not None]
