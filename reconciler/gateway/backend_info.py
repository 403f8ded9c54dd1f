"""What one backend can hold and do, as automatic routing needs it: the tokens one request
may use (each kind's own rule, kept here and nowhere else) and its capabilities (declared,
else from its kind, model file and flags)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from reconciler.config.schema import BackendSpec, DesiredState
from reconciler.models.capabilities import model_capabilities

log = logging.getLogger(__name__)
# GGUF keys that say what a model can do (see model_capabilities).
_GGUF_KEYS = ("tokenizer.chat_template", "tokenizer.ggml.fim_pre_token_id", "clip.has_vision_encoder")
# llama-server flags that switch on endpoints whatever the model (its --embeddings, --reranking).
_LLAMACPP_FLAGS = {"--embeddings": "embedding", "--embedding": "embedding", "--reranking": "rerank",
                   "--rerank": "rerank", "--mmproj": "vision"}  # fmt: skip
# Where each kind's embeddings are switched on: named in the 400 a request gets without them.
EMBEDDING_SETTING = {
    "llamacpp": "add '--embeddings' (and '--pooling mean' for a chat model) to backends.{name}.extra_args",
    "vllm": "serve an embedding model with '--runner pooling' in backends.{name}.extra_args",
    "tgi": "TGI does not serve embeddings; run text-embeddings-inference and declare it with kind 'tgi' "
    "and capabilities: [embedding]",
    "ollama": "use an embedding model (for example nomic-embed-text) for backends.{name}.model",
    "openai": "set backends.{name}.capabilities to include 'embedding' if the server has them",
}


def request_context(backend: BackendSpec) -> int | None:
    """Tokens one request may hold, prompt and answer together, by the kind's own semantics:
    llama.cpp splits `context_size` across its `parallel` slots; vLLM (max_model_len), TGI
    (max_total_tokens) and Ollama (num_ctx per request) give every sequence the whole context.
    None when a remote backend's context is not declared: the backend judges."""
    if backend.url and "context_size" not in backend.model_fields_set:
        return None
    if backend.kind == "llamacpp":
        return backend.context_size // backend.parallel
    return backend.context_size


def backend_capabilities(name: str, state: DesiredState) -> frozenset[str]:
    backend = state.backends[name]
    if backend.capabilities is not None:
        return frozenset(backend.capabilities)
    metadata = gguf_metadata(backend.model, state) if backend.kind == "llamacpp" else None
    kind = backend.kind if backend.wire_protocol != "openai" else "openai"
    found = set(model_capabilities(metadata, None, kind))
    if backend.kind == "llamacpp":
        # llama-server serves embeddings and reranking only when started for them.
        found -= {"embedding", "rerank"}
        found |= {cap for flag, cap in _LLAMACPP_FLAGS.items() if flag in backend.extra_args}
    if backend.kind == "vllm" and {"embed", "pooling", "--task=embed", "--runner=pooling"} & set(backend.extra_args):
        found.add("embedding")  # vLLM serves embeddings from a pooling runner only
    return frozenset(found)


def gguf_metadata(model: str, state: DesiredState) -> dict | None:
    """The capability-relevant key/values of a model's GGUF file, None when it is not here
    (remote backend, not pulled yet): then the kind's defaults apply."""
    from reconciler.models.pull import local_path
    from reconciler.paths import models_dir

    try:
        path = local_path(model, state.models[model], models_dir(state.models_dir))
    except (OSError, ValueError) as exc:
        log.debug("no model file for %s: %s", model, exc)
        return None
    if path is None or not Path(path).is_file():
        return None
    return read_metadata(Path(path))


def read_metadata(path: Path) -> dict | None:
    try:
        from gguf import GGUFReader

        from reconciler.models.gguf_info import check_gguf

        check_gguf(path)
        reader = GGUFReader(str(path))
    except (ImportError, OSError, ValueError) as exc:
        log.warning("cannot read capabilities from %s: %s", path, exc)
        return None
    wanted = {}
    for key, field in reader.fields.items():
        if key in _GGUF_KEYS or key.endswith(".pooling_type"):
            wanted[key] = field.contents()
    return wanted


@dataclass(frozen=True)
class BackendInfo:
    kind: str
    context: int | None  # tokens per request (request_context)
    capabilities: frozenset[str]


def backend_infos(state: DesiredState) -> dict[str, BackendInfo]:
    return {
        name: BackendInfo(b.kind, request_context(b), backend_capabilities(name, state))
        for name, b in state.backends.items()
    }
