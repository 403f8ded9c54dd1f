"""Fitting text into a model's context: a chars-per-token estimate turns the context length
into a character budget; sources are cut into chunks at line boundaries and lists of
summaries are packed into batches that fit."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Chat templates add role markers and a system prompt around the text we measure.
TEMPLATE_OVERHEAD_TOKENS = 64
PROMPT_WORDS_CHARS = 300  # the prompts' own words around the source or the summaries
MIN_ROOM_CHARS = 64  # below this a chunk of source or a packed summary says nothing


@dataclass(frozen=True)
class Budget:
    context_tokens: int  # what one request may use in total (one slot of the backend)
    max_tokens: int  # reserved for the answer
    chars_per_token: float = 3.0  # code tokenizes denser than prose; err on the safe side
    answer_option: str = "--max-tokens"  # the option max_tokens came from, for the message
    retry: bool = False  # the halved estimate, already checked with the budget it came from

    def __post_init__(self) -> None:
        if self.retry:
            return
        if self.prompt_tokens < 128:
            raise ValueError(
                f"context of {self.context_tokens} tokens leaves no room for a prompt after "
                f"{self.max_tokens} answer tokens; lower {self.answer_option} or raise "
                "--context-tokens"
            )
        # A refused prompt is retried with the halved estimate: that one must fit too, or
        # chunking and packing would be asked for room that is not there.
        room = self.halved().room
        if room < MIN_ROOM_CHARS:
            raise ValueError(
                f"context of {self.context_tokens} tokens is too small: after {self.max_tokens} "
                f"answer tokens and the fixed prompt, a retried request has room for {room} "
                f"characters (at least {MIN_ROOM_CHARS} needed); raise --context-tokens or "
                f"lower {self.answer_option}"
            )

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens - self.max_tokens - TEMPLATE_OVERHEAD_TOKENS

    @property
    def prompt_chars(self) -> int:
        return int(self.prompt_tokens * self.chars_per_token)

    @property
    def header_chars(self) -> int:
        """At most this much of a prompt goes to the header (module facts, repository facts)."""
        return self.prompt_chars // 4

    @property
    def room(self) -> int:
        """What is left for source or summaries in the worst case: a full header and the
        prompt's own words."""
        return self.prompt_chars - self.header_chars - PROMPT_WORDS_CHARS

    def halved(self) -> Budget:
        """The same budget with a more pessimistic estimate, after a prompt was refused."""
        return replace(self, chars_per_token=self.chars_per_token / 2, retry=True)


def truncate(text: str, limit: int, marker: str = "\n… (truncated)") -> str:
    """At most `limit` characters, the marker included (dropped when it alone would not fit)."""
    if len(text) <= limit:
        return text
    if limit <= len(marker):
        return text[: max(0, limit)]
    return text[: limit - len(marker)] + marker


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
    """Consecutive groups of items whose joined length stays within limit. Every item is cut
    to half the room so any two fit together: each group but the last holds at least two,
    and there are fewer groups than items (the reduction converges). Raises when the limit
    is too small for that."""
    half = (limit - len(separator)) // 2
    if half < 1:
        raise ValueError(f"{limit} characters cannot hold two summaries")
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for item in items:
        item = truncate(item, half)
        extra = len(item) + (len(separator) if current else 0)
        if current and size + extra > limit:
            groups.append(current)
            current, size = [], 0
            extra = len(item)
        current.append(item)
        size += extra
    if current:
        groups.append(current)
    if len(items) > 1 and len(groups) >= len(items):  # cannot happen; a loop must never spin
        raise ValueError(f"{len(items)} summaries do not pack into fewer groups")
    return groups
