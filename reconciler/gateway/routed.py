"""From a request body to the backends that will answer it: the name resolved (declared
names, then the operator's model_aliases and the placeholders, then `auto`), the request's
needs met (selection.py), its prompt counted with the backend's own tokenizer when the
choice depends on it, and max_tokens clamped to what fits. Shared by the OpenAI and Ollama
surfaces, so both behave alike."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from reconciler.gateway.adapters import Exchange
from reconciler.gateway.errors import GatewayError
from reconciler.gateway.metrics import GatewayMetrics
from reconciler.gateway.proxy_call import ProxyCall
from reconciler.gateway.request_body import check_fields, parse_json
from reconciler.gateway.request_id import trace_headers
from reconciler.gateway.router import Router, RoutingTable, Upstream
from reconciler.gateway.selection import (
    ENDPOINT_CAPABILITY,
    MAX_FIELDS,
    Choice,
    Needs,
    Refusal,
    choose,
    context_decides,
    endpoint_unsupported,
    estimate_tokens,
    plainly_fits,
    request_needs,
)

log = logging.getLogger(__name__)
TOKENIZE_TIMEOUT = 2.0  # an exact count is worth this much; past it, the estimate decides
CORE_ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings"))
TEXT_ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions"))
NO_CONTEXT = frozenset(("/tokenize", "/detokenize"))  # they generate nothing


@dataclass(frozen=True)
class Routed:
    endpoint: str
    body: dict[str, Any]
    raw: bytes  # the body to send: re-serialized only when the gateway changed it
    model: str  # canonical model
    requested: str  # what names the answer: the client's name, or the chosen model for `auto`
    eligible: frozenset[str] | None
    headers: list[tuple[bytes, bytes]]  # response headers saying what was chosen and clamped
    trace: tuple[tuple[str, str], ...]

    def call(self, stream: bool, affinity: str | None, client: str | None) -> ProxyCall:
        exchange = Exchange(self.endpoint, self.body, self.requested)
        return ProxyCall(
            exchange, self.raw, self.model, stream, affinity, client, self.eligible, self.trace
        )


class Routing:
    """Request parsing and routing, shared by every surface; a refusal raises GatewayError."""

    def __init__(self, router: Router, probe_client: httpx.AsyncClient, metrics: GatewayMetrics):
        self.router = router
        self.probe_client = probe_client  # asks backends' tokenizers
        self.metrics = metrics

    @property
    def table(self) -> RoutingTable:
        return self.router.table

    def unknown_model(self, requested: object) -> GatewayError:
        """404 naming what is served, so the client can fix the name."""
        known = ", ".join(sorted(self.table.names)) or "none"
        return self.metrics.refused(
            404, f"model {requested!r} not found; known models: {known}", "model_not_found"
        )

    async def route(self, raw: bytes, endpoint: str, headers: dict[bytes, bytes]) -> Routed:
        """The request checked, its backends chosen (by name, or by its needs for `auto` and
        the names mapped to it) and its max_tokens clamped to what fits."""
        body = parse_json(raw)
        if isinstance(body, tuple):
            raise self.metrics.refused(400, *body)
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise self.metrics.refused(400, "'model' must be a string", "missing_model")
        resolution = self.router.table.resolve_request(requested)
        if resolution is None:
            raise self.unknown_model(requested)
        problem = check_fields(endpoint, body)
        if problem is not None:
            raise self.metrics.refused(400, *problem)
        trace = trace_headers(headers)
        everyone = list(self.router.table.upstreams.values())
        if resolution.model is None:
            pool, label = everyone, f"auto ({requested!r})" if requested else "auto (no model)"
        else:
            pool, label = (
                [u for u in everyone if u.model == resolution.model],
                f"model {resolution.model}",
            )
        if endpoint.startswith("/api/") and resolution.model is not None:
            # Ollama's own request, to Ollama backends: the model is named, Ollama clamps itself.
            return Routed(
                endpoint,
                body,
                raw,
                resolution.model,
                requested or resolution.model,
                None,
                [],
                trace,
            )
        if not pool:  # declared without a backend: the proxy answers 503 naming why
            model = resolution.model or ""
            return Routed(endpoint, body, raw, model, requested or model, None, [], trace)
        if (
            resolution.via == "name"
            and endpoint in TEXT_ENDPOINTS
            and b"image" not in raw
            and plainly_fits(len(raw), body, pool)
        ):
            return Routed(endpoint, body, raw, resolution.model, requested, None, [], trace)  # type: ignore[arg-type]
        if endpoint not in CORE_ENDPOINTS and not any(
            ENDPOINT_CAPABILITY[endpoint] in u.capabilities for u in pool
        ):
            refusal = endpoint_unsupported(endpoint, requested or "auto", pool, everyone)
            raise self.metrics.refused(refusal.status, refusal.message, refusal.code)
        needs = request_needs(endpoint, body)
        prompt, counted = (0, True) if endpoint in NO_CONTEXT else (estimate_tokens(needs), False)
        if not counted and context_decides(needs, pool, prompt):
            exact = await count_tokens(self.probe_client, needs, pool)
            if exact is not None:
                prompt, counted = exact, True
        choice = choose(needs, pool, prompt, counted, label, auto=resolution.model is None)
        if isinstance(choice, Refusal):
            raise self.metrics.refused(choice.status, choice.message, choice.code)
        out = [(b"x-tensorforge-route", choice.reason.encode("ascii", "replace"))]
        changed = False
        if resolution.chosen_by_gateway and body.get("model") != choice.model:
            body["model"] = choice.model  # the answer names the served model, not the placeholder
            changed = True
        if choice.max_tokens is not None:
            for field in MAX_FIELDS:
                asked = body.get(field)
                if isinstance(asked, int) and asked > choice.max_tokens:
                    body[field] = choice.max_tokens
                    changed = True
                    note = (f"{choice.max_tokens} (clamped from {asked}: {choice.context} tokens per request, "
                            f"prompt {'' if counted else '~'}{prompt})")  # fmt: skip
                    out.append((b"x-tensorforge-max-tokens", note.encode()))
        if changed:
            raw = json.dumps(body).encode()
        name = choice.model if resolution.chosen_by_gateway else requested or choice.model
        return Routed(endpoint, body, raw, choice.model, name, choice.eligible, out, trace)

    def parse(self, raw: bytes, endpoint: str) -> tuple[dict[str, Any], str]:
        """(body, canonical model) of a request, its fields checked: a malformed request is
        the client's 400, never a backend failure. `auto` and placeholders choose by the
        estimate only (no tokenizer call, no clamping): `route` is the full path."""
        body = parse_json(raw)
        if isinstance(body, tuple):
            raise self.metrics.refused(400, *body)
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise self.metrics.refused(
                400, "'model' is required and must be a string", "missing_model"
            )
        resolution = self.table.resolve_request(requested)
        if resolution is None:
            raise self.unknown_model(requested)
        model = resolution.model or auto_model(self.table, endpoint, body)
        if model is None:
            raise self.metrics.refused(
                503,
                f"auto ({requested!r}): no backend can answer this request",
                "no_healthy_backend",
            )
        problem = check_fields(endpoint, body)
        if problem is not None:
            raise self.metrics.refused(400, *problem)
        return body, model


def auto_model(table: RoutingTable, endpoint: str, body: dict[str, Any]) -> str | None:
    """For callers that cannot wait for a tokenizer (the WebSocket's parse_request): the model
    `auto` picks by the estimate alone; None when no backend can answer."""
    needs = request_needs(endpoint, body)
    choice = choose(needs, list(table.upstreams.values()), estimate_tokens(needs), False, "auto")
    return choice.model if isinstance(choice, Choice) else None


async def count_tokens(client: httpx.AsyncClient, needs: Needs, pool: list[Upstream]) -> int | None:
    """The prompt's tokens by the tokenizer of a backend that has one (llama.cpp and vLLM's
    `/tokenize`), plus the chat template's allowance; None if none answers in time."""
    for upstream in pool:
        if "tokenize" not in upstream.capabilities or not upstream.healthy:
            continue
        if upstream.kind == "vllm":
            request: dict[str, Any] = {"model": upstream.served_name, "prompt": needs.text}
        else:
            request = {"content": needs.text, "add_special": True}
        try:
            response = await client.post(
                upstream.base_url + "/tokenize",
                json=request,
                headers=upstream.headers,
                timeout=TOKENIZE_TIMEOUT,
            )
            answer = response.json()
            tokens = answer.get("count") or len(answer["tokens"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.debug("counting tokens on %s failed: %s", upstream.name, exc)
            continue
        return int(tokens) + needs.template_tokens
    return None
