"""Where a prompt's prefix is probably cached: an approximate record, per backend, of the
prompt prefixes recently sent to it.

A backend that already holds a prompt's prefix in its KV cache (llama.cpp's slots and host
prompt cache, vLLM's and SGLang's automatic prefix caching) skips that part of the prefill.
The gateway cannot see those caches directly, so it remembers what it sent where, the way
vLLM's and SGLang's routers do: prompts are cut into fixed-size character blocks, each
block's hash chained to the one before it (so a hash stands for the whole prefix up to it),
and each backend keeps a bounded, age-evicted set of the hashes it has seen.

What was sent is not what is held: a backend evicts (llama.cpp's few slots and its bounded
host cache, least recently used first). Backends say how much of each prompt they took from
their cache (OpenAI's `usage.prompt_tokens_details.cached_tokens`: llama.cpp always, vLLM
with --enable-prompt-tokens-details, SGLang), so the record is corrected by that: a prefix
expected and not found was evicted, and so was everything sent there before it."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BLOCK_CHARS = 128  # characters, about 32 tokens: fine enough to find a shared system prompt
MAX_PROMPT_BLOCKS = 512  # past 64k characters of shared prefix, longer matches change nothing
DEFAULT_CAPACITY = 16_384  # blocks per backend (2M characters, ~500k tokens): ~3 MB of memory
DEFAULT_TTL_SECONDS = 600.0  # a prefix not seen for this long has probably left the cache

_ROLE_END = "\x1e"  # separators no chat text contains, so role and content cannot run together
_FIELD_END = "\x1f"


def prompt_text(body: dict[str, Any]) -> str:
    """The part of a request that a backend's prefix cache keys on, as one string: the chat
    messages in order (role, then content), else the completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            parts.append(
                f"{message.get('role', '')}{_FIELD_END}{_content_text(message.get('content'))}{_ROLE_END}"
            )
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]  # a batch: its first prompt stands for where it should go
    return ""


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is a cacheable prefix
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prompt_blocks(body: dict[str, Any]) -> list[int]:
    """Chained hashes of the prompt's whole blocks: the i-th hash identifies its first
    (i + 1) * BLOCK_CHARS characters. A trailing partial block is left out. Python's own
    string hash, chained through a tuple: half the cost of a blake2b object per block, and
    the index lives in one process, where the hash's per-process seed is the same."""
    text = prompt_text(body)
    blocks: list[int] = []
    previous = 0
    for start in range(
        0, min(len(text), BLOCK_CHARS * MAX_PROMPT_BLOCKS) - BLOCK_CHARS + 1, BLOCK_CHARS
    ):
        previous = hash((previous, text[start : start + BLOCK_CHARS]))
        blocks.append(previous)
    return blocks


@dataclass(frozen=True)
class PrefixNote:
    """What the router expected of the chosen backend's cache for one request, to be checked
    against what the backend reports it took from its cache."""

    backend: str
    blocks: int  # the prompt's whole blocks
    matched: int  # of them, the leading ones recorded as sent there (at least one)
    last_sent: float  # when the last of those was sent there before this request


def cached_tokens(usage: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt tokens, of them taken from the cache) from an OpenAI usage object, when the
    backend says."""
    details = usage.get("prompt_tokens_details")
    prompt = usage.get("prompt_tokens")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if type(prompt) is int and type(cached) is int and 0 <= cached <= prompt:
        return prompt, cached
    return None


class PrefixSet:
    """The prefixes one backend was sent recently: bounded in count, evicted by age, oldest
    first. Not thread-safe: the gateway's event loop is its only user."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        ttl: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self._seen: OrderedDict[int, float] = OrderedDict()  # block hash -> last sent

    def __len__(self) -> int:
        return len(self._seen)

    def match(self, blocks: list[int]) -> int:
        """How many leading blocks of the prompt this backend was sent (and still holds)."""
        self._expire()
        matched = 0
        for block in blocks:
            if block not in self._seen:
                break
            matched += 1
        return matched

    def record(self, blocks: list[int]) -> None:
        """The prompt was sent here: its prefixes are now the freshest this backend holds."""
        now = self.clock()
        for block in blocks:
            self._seen[block] = now
            self._seen.move_to_end(block)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def note(self, backend: str, blocks: list[int]) -> PrefixNote | None:
        """Before recording `blocks` as sent: how much of them this backend should hold (None:
        nothing, so nothing to check)."""
        matched = self.match(blocks)
        if not matched:
            return None
        return PrefixNote(backend, len(blocks), matched, self._seen[blocks[matched - 1]])

    def reported(self, note: PrefixNote, prompt_tokens: int, cached: int) -> int:
        """The backend took `cached` of the prompt's `prompt_tokens` from its cache. Less than
        half of what the record expected: the expected prefix was evicted, and since caches
        evict the least recently used first, so was everything sent here before it; that is
        forgotten (the prompt just sent, recorded later, stays). How many blocks went."""
        expected = prompt_tokens * note.matched / note.blocks
        if cached >= expected / 2:
            return 0
        dropped = 0
        while self._seen:
            block, seen = next(iter(self._seen.items()))
            if seen > note.last_sent:
                break
            del self._seen[block]
            dropped += 1
        return dropped

    def clear(self) -> None:
        """The backend's cache is gone (it restarted, or went unhealthy and may have)."""
        self._seen.clear()

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl
        while self._seen:
            block, seen = next(iter(self._seen.items()))
            if seen >= horizon:
                return
            del self._seen[block]
