"""vLLM's OpenAI-compatible server: pass-through, except that vLLM answers 404 for any model
name but its `--served-model-name`, so aliases are rewritten to it."""

from __future__ import annotations

from reconciler.gateway.adapters.openai import OpenAIAdapter


class VLLMAdapter(OpenAIAdapter):
    protocol = "vllm"
    rewrite_model = True
    metrics_path = "/metrics"
    load_series = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    # Renamed between vLLM versions; whichever the backend exports is used.
    kv_series = ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")
