"""The OpenAI API of the TensorForge gateway (or any OpenAI-compatible server) as `analyze`
uses it: what the gateway says about the model (served? how much context?), one completion
at a time, and the answer cleaned of the loops and cut sentences small models produce."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from reconciler.analyze import prompts
from reconciler.analyze.budget import truncate
from reconciler.extras import MissingExtra

try:
    import openai
except ImportError as exc:  # the `analyze` extra
    raise MissingExtra("analyze", "tensorforge analyze", "openai") from exc

CONTEXT_KEYS = ("context_length", "max_model_len", "context_window", "n_ctx", "max_context_length")


@dataclass
class ModelInfo:
    served: bool
    known: list[str]
    context_tokens: int | None


class Completer(Protocol):
    def complete(self, prompt: str, max_tokens: int) -> str: ...


class GatewayUnreachable(Exception):
    pass


class GatewayError(Exception):
    """The gateway cannot give summaries (unreachable, key refused, model not served); the
    message names the fix."""


class GatewayClient:
    """The OpenAI API of the TensorForge gateway (or any OpenAI-compatible server)."""

    def __init__(
        self, gateway: str, model: str, timeout: float = 180.0, api_key: str | None = None
    ) -> None:
        self.model = model
        self.client = openai.OpenAI(
            base_url=gateway.rstrip("/") + "/v1", api_key=api_key or "not-needed",
            timeout=timeout, max_retries=0,
        )  # fmt: skip

    def probe(self, timeout: float = 5.0) -> ModelInfo:
        try:
            listing = self.client.with_options(timeout=timeout).models.list()
        except openai.APIConnectionError as exc:
            raise GatewayUnreachable(str(exc)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise GatewayError(
                f"GET /v1/models answered {exc.status_code} ({truncate(str(exc.message), 200)}): "
                "the gateway wants an API key; give one with --api-key KEY or TF_API_KEY, or "
                "pass --no-summaries for the structure alone"
            ) from None
        except openai.APIStatusError as exc:
            raise GatewayUnreachable(f"GET /v1/models answered {exc.status_code}") from None
        known: list[str] = []
        for entry in listing.data:
            data = entry.model_dump()
            names = [data.get("id"), *(data.get("aliases") or [])]
            known.append(str(data.get("id")))
            if self.model in names:
                return ModelInfo(True, known, _context_of(data))
        return ModelInfo(False, known, None)

    def complete(self, prompt: str, max_tokens: int) -> str:
        response = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=0.0, frequency_penalty=0.5,
        )  # fmt: skip
        return clean(response.choices[0].message.content or "")


def _context_of(data: dict) -> int | None:
    for source in (data, data.get("meta") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return None


# After ., ! or ?, possibly inside closing quotes or brackets (fixed-width lookbehinds).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]»”’])\s+")
_SENTENCE_END = re.compile(r"[.!?][)\]\"'`»”’]*$")


def whole_sentences(text: str) -> str:
    """The text up to its last complete sentence: an answer cut by max_tokens ends mid-word,
    and a half sentence reads as a claim it never made. Empty when no sentence is complete."""
    sentences = _SENTENCE_BREAK.split(text.strip())
    while sentences and not _SENTENCE_END.search(sentences[-1]):
        sentences.pop()
    return " ".join(sentences)


def clean(text: str, max_sentences: int = 5) -> str:
    """One paragraph without the loops small models fall into: a sentence, or a run of eight
    words, said a second time ends the answer there; only whole sentences are kept."""
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - 7):
        run = tuple(w.lower() for w in words[i : i + 8])
        if run in seen:
            words = words[:i]
            break
        seen.add(run)
    sentences: list[str] = []
    for sentence in _SENTENCE_BREAK.split(" ".join(words)):
        if sentence and sentence not in sentences:
            sentences.append(sentence)
    kept = whole_sentences(" ".join(sentences[:max_sentences]))
    while len(kept) > 900:  # five long sentences: drop whole ones, never cut one
        kept = whole_sentences(kept[: kept.rfind(" ", 0, 900)])
    return kept


def check_gateway(client: GatewayClient, gateway: str, model: str) -> ModelInfo:
    """What the gateway says about the model; GatewayError (naming the fix) when it is
    unreachable, refuses the key or does not serve the model."""
    try:
        info = client.probe()
    except GatewayUnreachable as exc:
        raise GatewayError(
            f"gateway {gateway} unreachable ({exc}); start it with `tensorforge server start`, "
            "give --gateway URL, or pass --no-summaries for the structure alone"
        ) from None
    if not info.served:
        raise GatewayError(
            f"model {model!r} is not served by {gateway} (served: {', '.join(info.known) or 'none'}); "
            "pick one with --model, or pass --no-summaries for the structure alone"
        )
    return info
