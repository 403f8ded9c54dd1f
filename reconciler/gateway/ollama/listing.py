"""`/api/tags` and `/api/ps`: every served model once, its aliases listed with it, described
from its file (`metadata.py`) or, for a model Ollama backends hold, by the backend itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from reconciler.gateway.adapters.ollama import tagged
from reconciler.gateway.core import GatewayCore
from reconciler.gateway.ollama import metadata

FACTS_SECONDS = 30.0  # how long a model's facts are reused before the registry is read again


class ModelListing:
    def __init__(self, core: GatewayCore):
        self.core = core
        self._facts: dict[str, tuple[float, asyncio.Future[Any]]] = {}  # model -> (started, result)

    def _lookup(self, model: str) -> asyncio.Future[Any]:
        """The model's facts, read in a thread once and shared by every caller; read again
        once FACTS_SECONDS old (the file's GGUF parse itself is cached per file version)."""
        now = time.monotonic()
        cached = self._facts.get(model)
        if cached is not None and not (cached[1].done() and now - cached[0] > FACTS_SECONDS):
            return cached[1]
        future = asyncio.ensure_future(asyncio.to_thread(self._read, model))
        self._facts[model] = (now, future)
        return future

    def _read(self, model: str) -> metadata.ModelFacts:
        try:
            return metadata.model_facts(self.core.state, model)
        except (OSError, ValueError, KeyError):  # unreadable, or gone in a reload: say nothing
            return metadata.ModelFacts()

    async def facts(self, model: str) -> metadata.ModelFacts:
        return await asyncio.shield(self._lookup(model))

    def known_facts(self, model: str) -> metadata.ModelFacts | None:
        """The facts if already read, else None (and the reading starts): a request never
        waits for a model file's first parse, which takes seconds on a busy machine."""
        future = self._lookup(model)
        return future.result() if future.done() else None

    async def tags(self, request: Request) -> Response:
        g = self.core
        out = []
        for model in g.table.served_models():
            aliases = sorted(a for a, m in g.table.names.items() if m == model and a != model)
            held = await self._held_by_ollama(model, "/api/tags")
            out.append({**metadata.entry(model, aliases, await self.facts(model)), **(held or {})})
        return JSONResponse({"models": out})

    async def ps(self, request: Request) -> Response:
        """Models with a healthy backend: what the gateway can answer with now."""
        g = self.core
        out = []
        for model in g.table.served_models():
            if not any(u.healthy for u in g.router.members(model)):
                continue
            facts = await self.facts(model)
            size, vram, context = metadata.memory(g.state, model, facts)
            aliases = sorted(a for a, m in g.table.names.items() if m == model and a != model)
            entry = {**metadata.entry(model, aliases, facts), "size": size, "size_vram": vram,
                     "expires_at": metadata.FOREVER, "context_length": context}  # fmt: skip
            out.append({**entry, **(await self._held_by_ollama(model, "/api/ps") or {})})
        return JSONResponse({"models": out})

    async def _held_by_ollama(self, model: str, path: str) -> dict[str, Any] | None:
        """For a model Ollama backends hold (no file here): the first healthy backend's own
        /api/tags or /api/ps entry for it (size, digest, times, details, memory), named as
        the gateway names it."""
        members = [u for u in self.core.router.members(model) if u.healthy]
        if not members or any(u.protocol != "ollama" for u in members):
            return None
        upstream = members[0]
        try:
            response = await self.core.probe_client.get(
                upstream.base_url + path, headers=upstream.headers
            )
            listed = response.json().get("models") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        wanted = tagged(upstream.served_name)
        for item in listed:
            if isinstance(item, dict) and wanted in (
                tagged(str(item.get("model", ""))),
                tagged(str(item.get("name", ""))),
            ):
                return {k: v for k, v in item.items() if k not in ("name", "model")}
        return None
