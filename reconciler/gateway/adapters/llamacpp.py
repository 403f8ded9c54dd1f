"""llama.cpp's `llama-server`: OpenAI's API natively, so requests and answers pass through
byte for byte. Load comes from its `--metrics` endpoint."""

from __future__ import annotations

from reconciler.gateway.adapters.openai import OpenAIAdapter


class LlamaCppAdapter(OpenAIAdapter):
    protocol = "llamacpp"
    rewrite_model = False  # llama-server serves one model and ignores the name
    metrics_path = "/metrics"
    load_series = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
    kv_series = ("llamacpp:kv_cache_usage_ratio",)
