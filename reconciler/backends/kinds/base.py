"""What a backend kind declares: its settings, launch line, health probe, gateway adapter,
memory estimate, metrics and dashboard. Every site that used to branch on a kind's name reads
these fields instead, so a new kind is its own module, its unit template and one registry line.

This module and the kind modules depend on pydantic and reconciler.monitoring.grafana only:
the configuration schema imports the registry (to derive the `kind` enum and check each kind's
settings), so nothing here may import the schema at run time."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from reconciler.monitoring.grafana import Dashboard


class BackendSettings(Protocol):
    """The declared backend as the kind modules read it. The schema's `BackendSpec` has these
    fields; naming them here, rather than importing the schema (which imports this table), keeps
    the kinds below the schema even for the type checker."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int | None: ...
    @property
    def binary(self) -> str | None: ...
    @property
    def context_size(self) -> int: ...
    @property
    def parallel(self) -> int: ...
    @property
    def threads(self) -> int | None: ...
    @property
    def tensor_parallel_size(self) -> int: ...
    @property
    def flash_attn(self) -> bool: ...
    @property
    def quantization(self) -> str | None: ...
    @property
    def kv_cache_dtype(self) -> str | None: ...
    @property
    def gpu_memory_utilization(self) -> float: ...
    @property
    def cpu_kv_cache_gib(self) -> int | None: ...
    @property
    def max_loaded_models(self) -> int | None: ...
    @property
    def extra_args(self) -> Sequence[str]: ...
    @property
    def environment(self) -> Mapping[str, str]: ...


class KindSettings(BaseModel):
    """The backend keys only some kinds use, as this kind takes them. A key declared here is
    one the kind passes to its server (or counts in its memory estimate); a key another kind
    uses, set on this kind to anything but its default, is an error naming the kinds that use
    it. Subclasses add per-kind checks (allowed values) as pydantic validators."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchRequest:
    """What a kind's launcher gets: the backend, the names and files it serves, its GPUs, and
    what the rest of TensorForge computes for it (so a kind module need not import it)."""

    name: str
    backend: BackendSettings
    model_name: str  # the name clients use; servers that check it are told it
    model_ref: str  # a local file or directory, else the hub id or tag
    gpu_ids: list[int]
    listen: str  # HOST:PORT, IPv6 in brackets
    prompt_cache_mib: Callable[[], int]  # llama.cpp's --cache-ram default (gpu/vram.py)


@dataclass(frozen=True)
class Probe:
    """How the reconciler and the gateway ask a backend whether it serves."""

    method: str = "GET"
    path: str = "/health"
    loading_status: int | None = None  # answered while the model loads (llama.cpp: 503)
    # Where it lists the model names it answers to, checked once the probe says 200: a server
    # that answers 404 for any name but its own must list the declared one.
    model_list: str | None = None


@dataclass(frozen=True)
class Metrics:
    """The server's own Prometheus endpoint: scraped by Prometheus (one job per backend) and
    by the gateway for least-load routing."""

    path: str = "/metrics"
    load_series: tuple[str, ...] = ()  # summed: running plus queued requests
    kv_series: tuple[str, ...] = ()  # KV-cache usage as a fraction (the largest is used)


@dataclass(frozen=True)
class Memory:
    """How placement estimates the server's GPU memory (reconciler/gpu/vram.py)."""

    weights: Literal["gguf", "safetensors"] | None = None  # None: no estimate, GPUs counted
    # A setting naming the fraction of each GPU the server takes at start, whatever it needs
    # (vLLM's gpu_memory_utilization); None: it takes what it needs.
    reserved_fraction: str | None = None


# Request fields, for what each kind's server takes beyond OpenAI's sampling fields (the
# Ollama surface refuses an option the model's backends cannot honour).
OPENAI_FIELDS = frozenset(
    ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty")
)
CHAT_FIELDS = frozenset(("tools", "logprobs", "top_logprobs"))  # OpenAI's own chat fields
THINK_FIELDS = frozenset(("chat_template_kwargs", "reasoning_effort"))
# llama.cpp's sampling fields: the gateway's internal spelling of Ollama's options.
LLAMACPP_FIELDS = OPENAI_FIELDS | frozenset((
    "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "mirostat", "mirostat_tau",
    "mirostat_eta", "n_keep",
))  # fmt: skip


@dataclass(frozen=True)
class Gateway:
    """What the gateway needs beyond the adapter: what the server offers whatever the model,
    and which request fields beyond OpenAI's it takes (per endpoint family)."""

    adapter: str  # "module:Class", imported by the gateway (config must not import it)
    capabilities: tuple[str, ...] = ("completion", "tools", "json_schema")
    embedding_hint: str = (
        "set backends.{name}.capabilities to include 'embedding' if the server has them"
    )
    # Capabilities that depend on the server's flags (--embeddings): unknown for a remote one.
    flag_capabilities: bool = False
    fill_in_middle: bool = False  # answers /infill-style requests from a model with FIM tokens
    chat_fields: frozenset[str] = frozenset()
    text_fields: frozenset[str] = frozenset()
    # llama.cpp splits its context over the parallel slots; the others give each request all.
    context_per_slot: bool = False


@dataclass(frozen=True)
class Kind:
    name: str  # the desired state's `kind:` and the default wire protocol
    title: str  # how people write it (vLLM, llama.cpp)
    settings: type[KindSettings]
    launch: Callable[[LaunchRequest], Launch]
    gateway: Gateway
    probe: Probe = Probe()
    metrics: Metrics | None = None  # None: no Prometheus endpoint
    dashboard: Dashboard | None = None
    memory: Memory = Memory()
    # Splits a model over tensor_parallel_size GPUs, one per shard (unset gpus: one per shard).
    shards: bool = False
    # An environment variable naming where the server downloads models itself (Ollama): the
    # unit gets a writable directory for it.
    models_dir_env: str | None = None

    def settings_fields(self) -> frozenset[str]:
        return frozenset(self.settings.model_fields)


def gpu_env(gpu_ids: list[int]) -> dict[str, str]:
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, which is what a CPU backend wants.
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids)}


def with_backend_env(request: LaunchRequest, argv: list[str], env: dict[str, str]) -> Launch:
    """The launch line plus the backend's extra_args, its GPUs and its own environment last
    (so a user's value wins)."""
    backend = request.backend
    return Launch(
        argv + list(backend.extra_args), {**gpu_env(request.gpu_ids), **env, **backend.environment}
    )
