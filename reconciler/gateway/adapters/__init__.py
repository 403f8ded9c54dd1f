"""One adapter per backend wire protocol. Where a backend speaks OpenAI already, bytes pass
through untouched; where it does not, the adapter translates to OpenAI's shapes."""

from __future__ import annotations

from reconciler.gateway.adapters.base import Adapter
from reconciler.gateway.adapters.openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
    "llamacpp": OpenAIAdapter(),
    "vllm": OpenAIAdapter(),
    "tgi": OpenAIAdapter(),
    "ollama": OpenAIAdapter(),
}


def adapter_for(protocol: str) -> Adapter:
    return ADAPTERS[protocol]
