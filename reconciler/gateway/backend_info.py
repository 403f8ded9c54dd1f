"""What one backend can hold and do, as automatic routing needs it: the tokens one request
may use (each kind's own rule, kept here and nowhere else) and its capabilities (declared,
else from its kind, model file and flags)."""

from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.backends.registry import GENERIC_PROTOCOL, KINDS, kind_of
from reconciler.config.schema import BackendSpec, DesiredState
from reconciler.models.capabilities import model_capabilities

log = logging.getLogger(__name__)
# GGUF keys that say what a model can do (see model_capabilities); also every `*.pooling_type`,
# `clip.*` and `*.vision.*` key and the fill-in-the-middle token ids.
_GGUF_KEYS = ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.tokens")
# What each kind's server offers whatever the model (model_capabilities says what the model adds).
SERVER_CAPABILITIES: dict[str, tuple[str, ...]] = {
    **{k.name: k.gateway.capabilities for k in KINDS.values()},
    GENERIC_PROTOCOL: ("completion", "tools", "json_schema", "responses", "embedding"),
}
# llama-server flags that switch on endpoints whatever the model (its --embeddings, --reranking).
_LLAMACPP_FLAGS = {"--embeddings": "embedding", "--embedding": "embedding", "--reranking": "rerank",
                   "--rerank": "rerank", "--mmproj": "vision"}  # fmt: skip
# Kinds whose endpoints depend on the server's flags (--embeddings, --runner pooling).
FLAG_KINDS = frozenset(k.name for k in KINDS.values() if k.gateway.flag_capabilities)
# Where each kind's embeddings are switched on: named in the 400 a request gets without them.
EMBEDDING_SETTING = {
    **{k.name: k.gateway.embedding_hint for k in KINDS.values()},
    GENERIC_PROTOCOL: "set backends.{name}.capabilities to include 'embedding' if the server has them",
}


def request_context(backend: BackendSpec) -> int | None:
    """Tokens one request may hold, prompt and answer together, by the kind's own semantics:
    llama.cpp splits `context_size` across its `parallel` slots; vLLM (max_model_len), TGI
    (max_total_tokens) and Ollama (num_ctx per request) give every sequence the whole context.
    None when a remote backend's context is not declared: the backend judges."""
    if backend.url and "context_size" not in backend.model_fields_set:
        return None
    if kind_of(backend.kind).gateway.context_per_slot:
        return backend.context_size // backend.parallel
    return backend.context_size


def backend_capabilities(name: str, state: DesiredState) -> frozenset[str]:
    backend = state.backends[name]
    if backend.capabilities is not None:
        return frozenset(backend.capabilities)
    metadata = gguf_metadata(backend.model, state) if backend.kind == "llamacpp" else None
    kind = backend.kind if backend.wire_protocol != GENERIC_PROTOCOL else GENERIC_PROTOCOL
    found = set(model_capabilities(metadata, None, backend.kind)) | set(SERVER_CAPABILITIES[kind])
    if backend.kind == "llamacpp":
        # llama-server serves embeddings and reranking only when started for them.
        found -= {"embedding", "rerank"}
        found |= {cap for flag, cap in _LLAMACPP_FLAGS.items() if flag in backend.extra_args}
    if backend.kind == "vllm" and {"embed", "pooling", "--task=embed", "--runner=pooling"} & set(
        backend.extra_args
    ):
        found.add("embedding")  # vLLM serves embeddings from a pooling runner only
    return frozenset(found)


def gguf_metadata(model: str, state: DesiredState) -> dict[str, Any] | None:
    """The capability-relevant key/values of a model's GGUF file, None when it is not here
    (remote backend, not pulled yet): then the kind's defaults apply."""
    from reconciler.models.pull import local_path
    from reconciler.paths import models_dir

    try:
        path = local_path(model, state.models[model], models_dir(state.models_dir, state.state_dir))
    except (OSError, ValueError) as exc:
        log.debug("no model file for %s: %s", model, exc)
        return None
    if path is None or not Path(path).is_file():
        return None
    return read_metadata(Path(path))


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The capability keys of a GGUF file's header, read without the tensor table (gguf's
    GGUFReader parses all of it: 10 s for SmolLM2 on a busy host; this takes milliseconds).
    Every length is checked against the file, so a corrupt file is a warning, not a hang."""
    try:
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            return _header_values(data)
    except (OSError, ValueError, struct.error) as exc:
        log.warning("cannot read capabilities from %s: %s", path, exc)
        return None


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def _header_values(data: mmap.mmap) -> dict[str, Any]:
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    _, _, count = struct.unpack_from("<IQQ", data, 4)
    at = 24
    found: dict[str, Any] = {}

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", data, at)
        if at + 8 + n > len(data):
            raise ValueError("a string runs past the end of the file")
        return data[at + 8 : at + 8 + n], at + 8 + n

    def skip(kind: int, at: int) -> int:
        if kind in _SCALARS:
            return at + struct.calcsize(_SCALARS[kind])
        if kind == _STRING:
            return string(at)[1]
        raise ValueError(f"unknown value type {kind}")

    for _ in range(count):
        key, at = string(at)
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4
        name = key.decode("utf-8", "replace")
        wanted = name in _GGUF_KEYS or name.endswith(".pooling_type") or name.startswith(
            ("clip.", "tokenizer.ggml.fim_")) or ".vision." in name  # fmt: skip
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", data, at)
            at += 12
            strings: list[str] = []
            if item in _SCALARS:  # fixed size: one jump
                at += n * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(n):
                    if wanted and item == _STRING:
                        value, at = string(at)
                        strings.append(value.decode("utf-8", "replace"))
                    else:
                        at = skip(item, at)
            if at > len(data):
                raise ValueError("an array runs past the end of the file")
            if wanted:
                found[name] = strings
        elif wanted and kind == _STRING:
            value, at = string(at)
            found[name] = value.decode("utf-8", "replace")
        elif wanted and kind in _SCALARS:
            (found[name],) = struct.unpack_from(_SCALARS[kind], data, at)
            at = skip(kind, at)
        else:
            at = skip(kind, at)
    return found


@dataclass(frozen=True)
class BackendInfo:
    kind: str
    context: int | None  # tokens per request (request_context)
    capabilities: frozenset[str]
    # Declared, or read from a server this host starts. A server declared by URL was started
    # with flags (and a model file) this host cannot see: what it lacks here, it may have.
    certain: bool = True


def backend_infos(state: DesiredState) -> dict[str, BackendInfo]:
    return {
        name: BackendInfo(
            b.kind,
            request_context(b),
            backend_capabilities(name, state),
            certain=b.managed or b.capabilities is not None or b.kind not in FLAG_KINDS,
        )  # fmt: skip
        for name, b in state.backends.items()
    }


def lacks_hint(name: str, backend: BackendInfo, managed: bool = True) -> str:
    """How to give backend `name` embeddings, for the 400 a request without them gets."""
    if backend.kind == "llamacpp" and not managed:
        return "start that llama-server with '--embeddings' (and '--pooling mean' for a chat model)"
    return EMBEDDING_SETTING.get(backend.kind, EMBEDDING_SETTING[GENERIC_PROTOCOL]).format(
        name=name
    )
