"""Backends that speak OpenAI's API (llama.cpp's server, vLLM, generic servers)."""

from __future__ import annotations

import json

from reconciler.gateway.adapters.base import Adapter, UpstreamRequest


class OpenAIAdapter(Adapter):
    protocol = "openai"

    def build_request(
        self, endpoint: str, body: dict, raw: bytes, served_model: str
    ) -> UpstreamRequest:
        # Clients may use an alias; servers such as vLLM only know their served name.
        if body.get("model") != served_model:
            raw = json.dumps({**body, "model": served_model}).encode()
        return UpstreamRequest("POST", endpoint, raw, {"content-type": "application/json"})
