"""One adapter per backend wire protocol. Where a backend speaks OpenAI already, bytes pass
through untouched; where it does not, the adapter translates to OpenAI's shapes."""

from __future__ import annotations

from reconciler.gateway.adapters.base import Adapter, Exchange, Unsupported
from reconciler.gateway.adapters.llamacpp import LlamaCppAdapter
from reconciler.gateway.adapters.ollama import OllamaAdapter
from reconciler.gateway.adapters.openai import OpenAIAdapter
from reconciler.gateway.adapters.tgi import TGIAdapter
from reconciler.gateway.adapters.vllm import VLLMAdapter

ADAPTERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
    "llamacpp": LlamaCppAdapter(),
    "vllm": VLLMAdapter(),
    "tgi": TGIAdapter(),
    "ollama": OllamaAdapter(),
}

__all__ = ["ADAPTERS", "Adapter", "Exchange", "Unsupported", "adapter_for"]


def adapter_for(protocol: str) -> Adapter:
    return ADAPTERS[protocol]
