"""Backends that speak OpenAI's API as it is (generic OpenAI-compatible servers)."""

from __future__ import annotations

import json

from reconciler.gateway.adapters.base import JSON_HEADERS, Adapter, Exchange, UpstreamRequest


class OpenAIAdapter(Adapter):
    protocol = "openai"
    rewrite_model = True  # servers that check the name only know their served one
    stream_usage_option = True

    def build_request(self, exchange: Exchange, raw: bytes, served_model: str) -> UpstreamRequest:
        if self.rewrite_model and exchange.body.get("model") != served_model:
            raw = json.dumps({**exchange.body, "model": served_model}).encode()
        return UpstreamRequest("POST", exchange.endpoint, raw, JSON_HEADERS)
