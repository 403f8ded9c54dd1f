"""Fitting text into a model's context: a chars-per-token estimate turns the context length
into a character budget; sources are cut into chunks at line boundaries and lists of
summaries are packed into batches that fit."""

from __future__ import annotations

from dataclasses import dataclass

# Chat templates add role markers and a system prompt around the text we measure.
TEMPLATE_OVERHEAD_TOKENS = 64


@dataclass(frozen=True)
class Budget:
    context_tokens: int  # what one request may use in total (one slot of the backend)
    max_tokens: int  # reserved for the answer
    chars_per_token: float = 3.0  # code tokenizes denser than prose; err on the safe side

    def __post_init__(self) -> None:
        if self.prompt_tokens < 128:
            raise ValueError(
                f"context of {self.context_tokens} tokens leaves no room for a prompt after "
                f"{self.max_tokens} answer tokens; lower --max-tokens or raise --context-tokens"
            )

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens - self.max_tokens - TEMPLATE_OVERHEAD_TOKENS

    @property
    def prompt_chars(self) -> int:
        return int(self.prompt_tokens * self.chars_per_token)

    def halved(self) -> Budget:
        """The same budget with a more pessimistic estimate, after a prompt was refused."""
        return Budget(self.context_tokens, self.max_tokens, self.chars_per_token / 2)


def truncate(text: str, limit: int, marker: str = "\n… (truncated)") -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(marker))] + marker


def chunk_text(text: str, limit: int) -> list[str]:
    """Consecutive pieces of at most `limit` characters, cut at line ends where possible."""
    if limit <= 0:
        raise ValueError("chunk limit must be positive")
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:  # a minified or generated line: cut it hard
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:limit])
            line = line[limit:]
        if len(current) + len(line) > limit:
            chunks.append(current)
            current = ""
        current += line
    if current or not chunks:
        chunks.append(current)
    return chunks


def pack(items: list[str], limit: int, separator: str = "\n") -> list[list[str]]:
    """Consecutive groups of items whose joined length stays within limit; an item longer
    than half the limit is truncated so every group holds at least two (reduction converges)."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for item in items:
        item = truncate(item, (limit - len(separator)) // 2)
        extra = len(item) + (len(separator) if current else 0)
        if current and size + extra > limit:
            groups.append(current)
            current, size = [], 0
            extra = len(item)
        current.append(item)
        size += extra
    if current:
        groups.append(current)
    return groups
