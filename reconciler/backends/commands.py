"""The exact command line and environment a backend is started with: its kind's launcher
(reconciler/backends/kinds/), shared by the process supervisor and the systemd templates, so
that a backend starts the same way under either driver. Flags are the real servers' own."""

from __future__ import annotations

from reconciler.backends.kinds.base import Launch, LaunchRequest, gpu_env
from reconciler.backends.kinds.llamacpp import CACHE_REUSE_TOKENS, find_llama_server
from reconciler.backends.kinds.vllm import find_vllm_python
from reconciler.backends.registry import kind_of
from reconciler.config.schema import BackendSpec, ModelSpec, host_port
from reconciler.gpu.vram import prompt_cache_mib

__all__ = [
    "CACHE_REUSE_TOKENS",
    "Launch",
    "find_llama_server",
    "find_vllm_python",
    "gpu_env",
    "launch_for",
    "model_reference",
]


def model_reference(name: str, model: ModelSpec, local_path: str | None) -> str:
    """What the server is told to load: a local file when pulled, else the hub id or tag."""
    if local_path:
        return local_path
    scheme, _, rest = model.source.partition(":")
    return rest if scheme in ("hf", "ollama") else name


def launch_for(
    name: str, backend: BackendSpec, model_name: str, model_ref: str, gpu_ids: list[int]
) -> Launch:
    request = LaunchRequest(
        name=name,
        backend=backend,
        model_name=model_name,
        model_ref=model_ref,
        gpu_ids=list(gpu_ids),
        listen=host_port(backend.host, backend.port or 0),
        prompt_cache_mib=lambda: prompt_cache_mib(backend, model_ref),
    )
    return kind_of(backend.kind).launch(request)
