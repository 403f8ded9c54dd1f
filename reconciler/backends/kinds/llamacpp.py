"""llama.cpp's `llama-server` (or, without one, the bundled xllamacpp server): one GGUF model,
OpenAI's API natively, its context split across `parallel` slots, load from `--metrics`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pydantic import field_validator

from reconciler.backends.kinds.base import (
    CHAT_FIELDS,
    LLAMACPP_FIELDS,
    THINK_FIELDS,
    Gateway,
    Kind,
    KindSettings,
    Launch,
    LaunchRequest,
    Memory,
    Metrics,
    Probe,
    with_backend_env,
)
from reconciler.monitoring.grafana import Dashboard, Panel
from reconciler.monitoring.promql import HB, RATE

# llama.cpp's --cache-type-k/--cache-type-v values (common/arg.cpp kv_cache_types).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
CACHE_REUSE_TOKENS = 256


class LlamaCppSettings(KindSettings):
    threads: int | None = None
    flash_attn: bool = False
    kv_cache_dtype: str | None = None
    cache_ram_mib: int | None = None

    @field_validator("kv_cache_dtype")
    @classmethod
    def _cache_type(cls, value: str | None) -> str | None:
        if value is not None and value not in CACHE_TYPES:
            raise ValueError(
                f"{value!r} is not a llama.cpp KV cache type: use one of {', '.join(CACHE_TYPES)} "
                "(passed as --cache-type-k and --cache-type-v)"
            )
        return value


def find_llama_server() -> str | None:
    """`llama-server` on PATH, else where `tensorforge bootstrap` installs it: the directory in
    TF_LLAMACPP_BIN_DIR, or next to this interpreter (the venv's bin/, often not on PATH when
    the CLI is run by its full path or from a service)."""
    found = shutil.which("llama-server")
    if found:
        return found
    places = [os.environ.get("TF_LLAMACPP_BIN_DIR"), os.path.dirname(sys.executable)]
    for directory in filter(None, places):
        candidate = Path(directory) / "llama-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def launch(request: LaunchRequest) -> Launch:
    backend = request.backend
    binary = backend.binary or find_llama_server()
    common = [
        "--host", backend.host,
        "--port", str(backend.port),
        "--ctx-size", str(backend.context_size),
        "--parallel", str(backend.parallel),
        "--alias", request.model_name,
    ]  # fmt: skip
    if backend.threads:
        common += ["--threads", str(backend.threads)]
    if backend.flash_attn:
        common += ["--flash-attn", "on"]
    if backend.kv_cache_dtype:
        # The memory estimate counts this type's bytes: the server must be told it too.
        common += [
            "--cache-type-k",
            backend.kv_cache_dtype,
            "--cache-type-v",
            backend.kv_cache_dtype,
        ]
    # Bounded host-memory prompt cache (llama.cpp's default, 8 GiB, grew without a ceiling).
    common += ["--cache-ram", str(request.prompt_cache_mib())]
    # A conversation's next turn reuses its slot's cache beyond the common prefix too (a
    # shifted chunk of at least this many tokens); the gateway's cache-aware routing sends it
    # back to that replica. cache_prompt (per request) is on by default.
    common += ["--cache-reuse", str(CACHE_REUSE_TOKENS)]
    ngl = ["--n-gpu-layers", "999" if request.gpu_ids else "0"]
    if binary:
        argv = [binary, "--model", request.model_ref, *common, *ngl, "--metrics", "--slots"]
    else:
        argv = [sys.executable, "-m", "reconciler.backends.llamacpp_server"]
        argv += ["--model", request.model_ref, *common, *ngl]
    return with_backend_env(request, argv, {})


DASHBOARD = Dashboard(
    "tensorforge-llamacpp",
    "TensorForge / llama.cpp backends",
    [
        Panel(
            "Scrape up",
            [(f'up{{{HB}, kind="llamacpp"}}', "{{backend}}")],
            kind="stat",
            width=24,
            max=1,
        ),
        Panel(
            "Generated tokens per second",
            [
                (
                    f"sum by (backend) (rate(llamacpp:tokens_predicted_total{{{HB}}}[{RATE}]))",
                    "{{backend}}",
                )
            ],
        ),
        Panel(
            "Prompt tokens per second (processed / from cache)",
            [
                (
                    f"sum by (backend) (rate(llamacpp:prompt_tokens_total{{{HB}}}[{RATE}]))",
                    "processed {{backend}}",
                ),
                (
                    f"sum by (backend) (rate(llamacpp:prompt_tokens_cached_total{{{HB}}}[{RATE}]))",
                    "cached {{backend}}",
                ),
            ],
        ),
        Panel(
            "Decode speed while generating (tokens/s)",
            [
                (
                    f"sum by (backend) (rate(llamacpp:tokens_predicted_total{{{HB}}}[{RATE}])) / "
                    f"sum by (backend) (rate(llamacpp:tokens_predicted_seconds_total{{{HB}}}[{RATE}]))",
                    "{{backend}}",
                )
            ],
            description="Tokens generated per second of generation time (empty while idle).",
        ),
        Panel(
            "Average throughput reported by the server (tokens/s)",
            [
                (f"llamacpp:predicted_tokens_seconds{{{HB}}}", "decode {{backend}}"),
                (f"llamacpp:prompt_tokens_seconds{{{HB}}}", "prompt {{backend}}"),
            ],
        ),
        Panel(
            "Requests processing / deferred",
            [
                (f"llamacpp:requests_processing{{{HB}}}", "processing {{backend}}"),
                (f"llamacpp:requests_deferred{{{HB}}}", "deferred {{backend}}"),
            ],
        ),
        Panel(
            "Busy slots per decode call",
            [(f"llamacpp:n_busy_slots_per_decode{{{HB}}}", "{{backend}}")],
        ),
        Panel(
            "Largest sequence seen (tokens)", [(f"llamacpp:n_tokens_max{{{HB}}}", "{{backend}}")]
        ),
    ],
    backend_kind="llamacpp",
)

KIND = Kind(
    name="llamacpp",
    title="llama.cpp",
    settings=LlamaCppSettings,
    launch=launch,
    gateway=Gateway(
        adapter="reconciler.gateway.adapters.llamacpp:LlamaCppAdapter",
        capabilities=("json_schema", "tokenize", "messages", "responses"),
        embedding_hint="add '--embeddings' (and '--pooling mean' for a chat model) to "
        "backends.{name}.extra_args",
        flag_capabilities=True,
        fill_in_middle=True,
        chat_fields=LLAMACPP_FIELDS | CHAT_FIELDS | THINK_FIELDS,
        text_fields=LLAMACPP_FIELDS,
        context_per_slot=True,
    ),
    probe=Probe("GET", "/health", loading_status=503),
    metrics=Metrics(
        load_series=("llamacpp:requests_processing", "llamacpp:requests_deferred"),
        kv_series=("llamacpp:kv_cache_usage_ratio",),
    ),
    dashboard=DASHBOARD,
    memory=Memory(weights="gguf"),
)
