"""Choosing backends by what a request needs: the context it takes (prompt plus the tokens it
asks for), the capabilities it uses, then load. Also where `max_tokens` (and Ollama's
`num_predict`, which becomes it) is clamped to what fits. Pure: counting tokens with a
backend's tokenizer happens in `app.py`, which calls `choose` again with the exact count."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypeGuard

from reconciler.gateway.backend_info import lacks_hint
from reconciler.gateway.router import Upstream

# What each endpoint needs a backend to offer (see reconciler/models/capabilities.py).
ENDPOINT_CAPABILITY = {
    "/v1/chat/completions": "completion", "/v1/completions": "completion", "/v1/embeddings": "embedding",
    "/v1/responses": "responses", "/v1/messages": "messages", "/v1/rerank": "rerank", "/rerank": "rerank",
    "/tokenize": "tokenize", "/detokenize": "tokenize", "/infill": "insert",
}  # fmt: skip
# Fields that cap the answer's length, by API: OpenAI chat and completions, Anthropic
# Messages (max_tokens), OpenAI Responses, llama.cpp's native /infill.
MAX_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")
# Fields whose text is part of the prompt (tools' JSON schemas count too).
PROMPT_FIELDS = ("messages", "prompt", "input", "system", "instructions", "tools", "input_prefix",
                 "input_suffix", "input_extra", "content", "query", "documents")  # fmt: skip
# Needs a backend of an explicitly named model must meet (else a clear 400 instead of the
# backend's 500 or 501). Tools, schemas and thinking only steer `auto`: with a named model,
# the backend judges them, as it did before automatic selection existed.
HARD_NEEDS = frozenset(("embedding", "vision", *ENDPOINT_CAPABILITY.values()))
TEMPLATE_TOKENS = (
    8  # what a chat template adds per message (role markers), at most, in common templates
)
PREAMBLE_TOKENS = (
    32  # and once per chat: a default system prompt some templates add (SmolLM2's: 20)
)
BYTES_PER_TOKEN = 3  # an estimate on the high side: English runs about 4 bytes per token


@dataclass(frozen=True)
class Needs:
    endpoint: str
    text: str  # what counts toward the prompt
    messages: int
    max_tokens: int | None
    capabilities: frozenset[str]

    @property
    def template_tokens(self) -> int:
        """What a chat template adds to the text's own tokens, at most."""
        return TEMPLATE_TOKENS * self.messages + (
            PREAMBLE_TOKENS if self.endpoint == "/v1/chat/completions" else 0
        )

    def describe(self, prompt_tokens: int, counted: bool) -> str:
        total = prompt_tokens + (self.max_tokens or 0)
        what = [f"{'' if counted else '~'}{total:,} tokens"]
        what += sorted(self.capabilities - {"completion"})
        return "needs " + " and ".join(what)


def request_needs(endpoint: str, body: dict[str, Any]) -> Needs:
    caps = {ENDPOINT_CAPABILITY.get(endpoint, "completion")}
    if body.get("tools"):
        caps.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        caps.add("json_schema")
    if body.get("reasoning_effort") or body.get("reasoning") or body.get("thinking"):
        caps.add("thinking")
    texts: list[str] = []
    for field in PROMPT_FIELDS:
        if field in body and _collect(body[field], texts):
            caps.add("vision")
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 1
    asked = [v for f in MAX_FIELDS if _is_count(v := body.get(f))]
    return Needs(endpoint, "\n".join(texts), count, max(asked) if asked else None, frozenset(caps))


def _collect(value: object, out: list[str], depth: int = 0) -> bool:
    """Append the prompt's strings to `out`; True if it holds an image. Base64 payloads (data:
    URLs) are not text: they would count as thousands of tokens."""
    image = False
    if isinstance(value, str):
        if not value.startswith("data:"):
            out.append(value)
    elif isinstance(value, dict) and depth < 32:
        kind = value.get("type")
        image = kind in ("image_url", "input_image", "image") or "image_url" in value
        for item in value.values():
            image = _collect(item, out, depth + 1) or image
    elif isinstance(value, list) and depth < 32:
        for item in value:
            image = _collect(item, out, depth + 1) or image
    return image


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def estimate_tokens(needs: Needs) -> int:
    """A fast count on the high side, for backends without a tokenizer endpoint and for
    deciding whether an exact count is needed at all."""
    return len(needs.text.encode()) // BYTES_PER_TOKEN + 1 + needs.template_tokens


@dataclass(frozen=True)
class Choice:
    model: str
    eligible: frozenset[str]  # upstream names the proxy may use, best first by its strategy
    reason: str  # one line: the x-tensorforge-route header
    max_tokens: int | None = None  # the clamped value to send, or None: as asked
    context: int | None = None  # the chosen backends' tokens per request, when known


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str


def plainly_fits(raw_size: int, body: dict[str, Any], pool: list[Upstream]) -> bool:
    """For a named model's text request, whether every backend surely takes it: the whole
    body's bytes bound its prompt, so nothing needs counting and no choice is left to make.
    The hot path: most requests end here."""
    asked = [v for f in MAX_FIELDS if _is_count(v := body.get(f))]
    need = raw_size // BYTES_PER_TOKEN + PREAMBLE_TOKENS + (max(asked) if asked else 1)
    return all(
        "completion" in u.capabilities and (u.context is None or u.context >= need) for u in pool
    )


def context_decides(needs: Needs, pool: list[Upstream], prompt_tokens: int) -> bool:
    """Whether an estimate of `prompt_tokens` leaves any backend short: only then is an exact
    count worth a call to a backend's tokenizer."""
    wanted = prompt_tokens + (needs.max_tokens or 1)
    return any(u.context is not None and wanted > u.context for u in pool)


def choose(
    needs: Needs,
    pool: list[Upstream],
    prompt_tokens: int,
    counted: bool,
    label: str,
    auto: bool = True,
) -> Choice | Refusal:
    """The backends of one model that can answer, or why none can. `pool` holds the requested
    model's backends (or every backend, for `auto`); `label` starts the reason ('auto',
    'model smollm2')."""
    wanted_caps = needs.capabilities if auto else needs.capabilities & HARD_NEEDS
    capable = [u for u in pool if wanted_caps <= u.capabilities]
    # A server declared by URL may have what its flags (unseen here) give it: it judges, and
    # says 501 for embeddings (made a 400 on the way back). Not images: llama.cpp answers
    # those with a 500, so a remote vision server declares capabilities: [vision].
    capable = capable or [
        u for u in pool if not u.info.certain and "vision" not in wanted_caps - u.capabilities
    ]
    if not capable:
        return _incapable(wanted_caps, pool, label)
    now = time.monotonic()
    live = [u for u in capable if u.available(now)] or capable  # none live: the proxy says why
    need = needs.describe(prompt_tokens, counted)

    def room(u: Upstream) -> int | None:
        return None if u.context is None else u.context - prompt_tokens

    fits_prompt = [u for u in live if (r := room(u)) is None or r > 0]
    if not fits_prompt:
        largest = max(live, key=lambda u: u.context or 0)
        if counted:
            return Refusal(
                400, f"{label}: the prompt is {prompt_tokens:,} tokens, more than the largest context per "
                f"request among its backends ({largest.name}: {largest.context:,} tokens); shorten it",
                "context_length_exceeded",
            )  # fmt: skip
        fits_prompt = live  # an estimate only: the backend judges
    wanted = needs.max_tokens or 1
    full = [u for u in fits_prompt if (r := room(u)) is None or r >= wanted]
    clamp = None
    if full:
        eligible = full
    else:
        best = max(room(u) or 0 for u in fits_prompt)
        eligible = [u for u in fits_prompt if room(u) == best]
        clamp = max(best, 1) if needs.max_tokens is not None else None
    chosen = min(eligible, key=lambda u: (u.score(), u.name))
    eligible = [u for u in eligible if u.model == chosen.model]
    short = sorted({u.name for u in live} - {u.name for u in eligible})
    reason = f"{label}: {need}; {', '.join(u.name for u in eligible)} ({chosen.model})"
    reason += " fits" if clamp is None else " has the most room"
    if short:
        reason += f"; {', '.join(short)} " + ("too small" if clamp is None else "smaller")
    contexts = [u.context for u in eligible if u.context is not None]
    return Choice(chosen.model, frozenset(u.name for u in eligible), reason, clamp,
                  min(contexts) if contexts else None)  # fmt: skip


def _incapable(wanted: frozenset[str], pool: list[Upstream], label: str) -> Refusal:
    missing = sorted(wanted - set().union(*(u.capabilities for u in pool)))
    names = ", ".join(f"{u.name} ({u.kind})" for u in pool) or "none"
    if "embedding" in missing and pool:
        first = pool[0]
        setting = lacks_hint(first.name, first.info)
        return Refusal(400, f"{label}: backend {first.name} ({first.kind}) does not serve embeddings; {setting}",
                       "embeddings_not_enabled")  # fmt: skip
    if "vision" in missing:
        return Refusal(400, f"{label}: the request has an image, but no backend of it reads images ({names}); "
                       "send text, or use a vision model (llama.cpp: '--mmproj FILE' in extra_args)", "model_not_vision")  # fmt: skip
    return Refusal(400, f"{label}: needs {', '.join(missing)}, which none of its backends has ({names}); "
                   "if one does, list it in backends.NAME.capabilities", "capability_unsupported")  # fmt: skip


def endpoint_unsupported(
    endpoint: str, requested: str, pool: list[Upstream], everyone: list[Upstream]
) -> Refusal:
    """A pass-through endpoint the requested model's backends do not serve, naming those that do."""
    capability = ENDPOINT_CAPABILITY[endpoint]
    serving = sorted(
        {f"{u.name} (model {u.model})" for u in everyone if capability in u.capabilities}
    )
    kinds = ", ".join(sorted({u.kind for u in pool})) or "none"
    where = "; served by " + ", ".join(serving) if serving else "; no backend here serves it"
    return Refusal(400, f"{endpoint} is not served by model {requested!r} (backend kind: {kinds}){where}",
                   "unsupported_endpoint")  # fmt: skip
