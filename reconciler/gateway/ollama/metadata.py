"""What `/api/tags`, `/api/ps` and `/api/show` say about a model, from real data: the model
registry (size, sha256 digest), the file itself (modification time, GGUF metadata: family,
parameter size, quantization, chat template) and the desired state (aliases, the backends'
context and memory). Reading a GGUF header is blocking work: call `model_facts` in a thread."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from reconciler.config.schema import DesiredState
from reconciler.models.capabilities import CAPABILITIES, model_capabilities
from reconciler.models.gguf_info import FILE_TYPES, read_attention
from reconciler.models.gguf_metadata import read_gguf_file, shown
from reconciler.models.pull import local_path, registry_for, sha256_file
from reconciler.paths import models_dir

EMBEDDING_FLAGS = frozenset(("--embedding", "--embeddings"))  # llama-server serves /v1/embeddings
FOREVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: a declared model stays loaded


def package_version() -> str:
    try:
        return version("tensorforge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


@dataclass(frozen=True)
class ModelFacts:
    path: str | None = None
    size: int = 0
    digest: str = ""
    modified_at: str | None = None  # unknown without a file: null, which clients accept
    details: dict[str, Any] = field(default_factory=dict[str, Any])
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    metadata: dict[str, Any] = field(default_factory=dict[str, Any])
    tensor_bytes: int = 0
    kv_bytes_per_token: int = 0  # f16 KV cache per token of context


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def parameter_size(count: int | None) -> str:
    """Ollama's spelling: 135M, 8.0B."""
    if not count:
        return ""
    if count >= 10**9:
        return f"{count / 10**9:.1f}B"
    return f"{count / 10**6:.0f}M"


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def registry_exists(directory: Path) -> bool:
    return bool(os.environ.get("TF_REGISTRY_URL")) or (directory / "registry.sqlite3").exists()


def model_file(state: DesiredState, model: str) -> tuple[str, str] | None:
    """(path, sha256) of the model's file: the registry's verified record, else a declared
    `path:` file (hashed here once per file version); None for a model Ollama holds itself
    or one not pulled yet."""
    spec = state.models[model]
    directory = models_dir(state.models_dir, state.state_dir)
    if registry_exists(directory):
        record = registry_for(directory).get(model)
        if record is not None and record.source == spec.source and record.files:
            if Path(record.files[0].path).is_file():
                return record.files[0].path, record.files[0].sha256
    path = local_path(model, spec, directory) if spec.source.startswith("path:") else None
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return str(path), _digest(str(path), stat.st_size, stat.st_mtime_ns)


def model_facts(state: DesiredState, model: str) -> ModelFacts:
    backends = [b for b in state.backends.values() if b.model == model]
    kinds: set[str] = {b.kind for b in backends} or {"openai"}
    found = model_file(state, model)
    if found is None:
        return ModelFacts(capabilities=_capabilities(None, kinds, backends))
    path, digest = found
    stat = Path(path).stat()
    metadata: dict[str, Any] = {}
    tensor_bytes = kv_per_token = params = 0
    if path.endswith(".gguf"):
        try:
            metadata, tensor_bytes, params = read_gguf_file(path)
            kv_per_token = 2 * _kv_elements(metadata)  # f16
        except (OSError, ValueError):
            metadata = {}  # unreadable header: the file facts still hold
    arch = str(metadata.get("general.architecture", ""))
    file_type = metadata.get("general.file_type")
    details = {
        "parent_model": "", "format": "gguf" if path.endswith(".gguf") else (state.models[model].format or ""),
        "family": arch, "families": [arch] if arch else None,
        "parameter_size": str(metadata.get("general.size_label") or parameter_size(params)),
        "quantization_level": FILE_TYPES.get(int(file_type), "") if file_type is not None else "",
    }  # fmt: skip
    return ModelFacts(
        path=path, size=stat.st_size, digest=digest, modified_at=iso(stat.st_mtime), details=details,
        capabilities=_capabilities(metadata or None, kinds, backends), metadata=metadata,
        tensor_bytes=tensor_bytes, kv_bytes_per_token=kv_per_token,
    )  # fmt: skip


def _kv_elements(metadata: dict[str, Any]) -> int:
    arch = str(metadata.get("general.architecture", ""))
    layers = int(metadata.get(f"{arch}.block_count", 0))
    width = int(metadata.get(f"{arch}.embedding_length", 0))
    return read_attention(metadata.get, arch, layers, width).kv_elements_per_token


def _capabilities(
    metadata: dict[str, Any] | None, kinds: set[str], backends: list[Any]
) -> list[str]:
    """What every backend of the model can do (a request may reach any of them)."""
    per_kind = [set(model_capabilities(metadata, None, kind)) for kind in sorted(kinds)]
    common = set.intersection(*per_kind)
    if backends and all(
        b.kind == "llamacpp" and EMBEDDING_FLAGS & set(b.extra_args) for b in backends
    ):
        common.add("embedding")
    return [c for c in CAPABILITIES if c in common]


def entry(model: str, aliases: list[str], facts: ModelFacts) -> dict[str, Any]:
    """One model in /api/tags: its aliases listed with it, not as models of their own."""
    return {"name": model, "model": model, "modified_at": facts.modified_at, "size": facts.size,
            "digest": facts.digest, "details": facts.details, "aliases": aliases}  # fmt: skip


def memory(state: DesiredState, model: str, facts: ModelFacts) -> tuple[int, int, int | None]:
    """(bytes in memory, of which on GPUs, context per request) over the model's backends:
    weights plus the f16 KV cache of their context, as llama.cpp allocates them (the compute
    buffer, tens of MiB, is not counted)."""
    total = vram = 0
    context = None
    for backend in state.backends.values():
        if backend.model != model:
            continue
        # A backend elsewhere has the context it was started with: known only if declared.
        known = backend.managed or "context_size" in backend.model_fields_set
        if known:
            context = max(context or 0, backend.context_size // backend.parallel)
        if facts.tensor_bytes:
            used = facts.tensor_bytes + (
                facts.kv_bytes_per_token * backend.context_size if known else 0
            )
            total += used
            vram += used if backend.gpus_wanted > 0 else 0
    return total, vram, context


def show(
    model: str, requested: str, facts: ModelFacts, context_limit: int | None
) -> dict[str, Any]:
    meta = facts.metadata
    info = (
        shown(meta) if meta else {"general.architecture": facts.details.get("family") or "unknown"}
    )
    if context_limit is not None:  # a request's share of the context, as the gateway enforces it
        info["tensorforge.context_length"] = context_limit
    template = str(meta.get("tokenizer.chat_template") or "")
    modelfile = (
        f"# Served by TensorForge from {facts.path}\nFROM {facts.path}\n" if facts.path else ""
    )
    parameters = f"num_ctx {context_limit}" if context_limit is not None else ""
    return {
        "license": str(meta.get("general.license") or ""), "modelfile": modelfile,
        "parameters": parameters, "template": template, "modified_at": facts.modified_at,
        "details": {**(facts.details or {"parent_model": "", "format": "", "family": "", "families": None,
                                          "parameter_size": "", "quantization_level": ""}),
                    "parent_model": model if model != requested else ""},
        "model_info": info, "capabilities": facts.capabilities,
    }  # fmt: skip
