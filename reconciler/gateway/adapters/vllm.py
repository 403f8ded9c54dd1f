"""vLLM's OpenAI-compatible server: pass-through, except that vLLM answers 404 for any model
name but its `--served-model-name`, so aliases are rewritten to it, and llama.cpp's
`repeat_penalty` (what the Ollama surface sends) is vLLM's `repetition_penalty`."""

from __future__ import annotations

import json

from reconciler.gateway.adapters.base import Exchange, UpstreamRequest
from reconciler.gateway.adapters.openai import OpenAIAdapter


class VLLMAdapter(OpenAIAdapter):
    protocol = "vllm"
    rewrite_model = True

    def build_request(self, exchange: Exchange, raw: bytes, served_model: str) -> UpstreamRequest:
        if "repeat_penalty" in exchange.body:
            body = {k: v for k, v in exchange.body.items() if k != "repeat_penalty"}
            body["repetition_penalty"] = exchange.body["repeat_penalty"]
            exchange = Exchange(exchange.endpoint, body, exchange.requested_model)
            raw = json.dumps(body).encode()
        return super().build_request(exchange, raw, served_model)
