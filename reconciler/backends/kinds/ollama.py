"""Ollama: `ollama serve`, which pulls and loads models itself (into OLLAMA_MODELS, which the
unit makes writable), is alive when `HEAD /` answers, and has no Prometheus endpoint: its
backends are seen through the gateway's metrics only."""

from __future__ import annotations

from reconciler.backends.kinds.base import (
    LLAMACPP_FIELDS,
    THINK_FIELDS,
    Gateway,
    Kind,
    KindSettings,
    Launch,
    LaunchRequest,
    Probe,
    with_backend_env,
)


class OllamaSettings(KindSettings):
    flash_attn: bool = False
    max_loaded_models: int | None = None


def launch(request: LaunchRequest) -> Launch:
    backend = request.backend
    env = {
        "OLLAMA_HOST": request.listen,
        "OLLAMA_NUM_PARALLEL": str(backend.parallel),
        "OLLAMA_CONTEXT_LENGTH": str(backend.context_size),
        "OLLAMA_MAX_LOADED_MODELS": str(backend.max_loaded_models or 1),
    }
    if backend.flash_attn:
        env["OLLAMA_FLASH_ATTENTION"] = "1"
    return with_backend_env(request, [backend.binary or "ollama", "serve"], env)


KIND = Kind(
    name="ollama",
    title="Ollama",
    settings=OllamaSettings,
    launch=launch,
    gateway=Gateway(
        adapter="reconciler.gateway.adapters.ollama:OllamaAdapter",
        capabilities=("completion", "tools", "json_schema", "embedding"),  # /api/embed, any model
        embedding_hint="use an embedding model (for example nomic-embed-text) for backends.{name}.model",
        fill_in_middle=True,
        # Served by Ollama and other kinds at once, the Ollama adapter translates back
        # (sampling fields to `options`, tools, think); by Ollama alone, nothing is translated.
        chat_fields=LLAMACPP_FIELDS | THINK_FIELDS | {"tools"},
        text_fields=LLAMACPP_FIELDS,
    ),
    probe=Probe("HEAD", "/"),
    models_dir_env="OLLAMA_MODELS",
)
