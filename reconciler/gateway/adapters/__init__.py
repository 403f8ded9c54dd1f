"""One adapter per backend wire protocol. Where a backend speaks OpenAI already, bytes pass
through untouched; where it does not, the adapter translates to OpenAI's shapes. Each backend
kind names its adapter class and declares its metrics (reconciler/backends/kinds/); the
adapters are built here, so the configuration never imports the gateway."""

from __future__ import annotations

import importlib

from reconciler.backends.kinds.base import Kind
from reconciler.backends.registry import GENERIC_PROTOCOL, KINDS
from reconciler.gateway.adapters.base import Adapter, Exchange, Unsupported
from reconciler.gateway.adapters.openai import OpenAIAdapter


def build_adapter(kind: Kind) -> Adapter:
    """The kind's adapter class (`module:Class`), reading load from the kind's metrics."""
    module, _, name = kind.gateway.adapter.partition(":")
    adapter_class = getattr(importlib.import_module(module), name)
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, Adapter)):
        raise TypeError(f"kind {kind.name}: adapter {kind.gateway.adapter} is not an Adapter")
    adapter: Adapter = adapter_class()
    adapter.protocol = kind.name
    if kind.metrics is not None:
        adapter.metrics_path = kind.metrics.path
        adapter.load_series = kind.metrics.load_series
        adapter.kv_series = kind.metrics.kv_series
    return adapter


ADAPTERS: dict[str, Adapter] = {
    GENERIC_PROTOCOL: OpenAIAdapter(),
    **{kind.name: build_adapter(kind) for kind in KINDS.values()},
}

__all__ = ["ADAPTERS", "Adapter", "Exchange", "Unsupported", "adapter_for", "build_adapter"]


def adapter_for(protocol: str) -> Adapter:
    return ADAPTERS[protocol]
