"""SGLang's server (`python -m sglang.launch_server`): OpenAI's API with its own scheduler and
prefix cache (RadixAttention), one GPU per tensor-parallel shard, and `mem_fraction_static` of
each GPU taken at start for the weights and the KV pool (the desired state's
`gpu_memory_utilization`). /health answers 503 while the server starts and 200 once it serves;
/v1/models lists its --served-model-name; `--enable-metrics` exports `sglang:*` on /metrics.

Flags and endpoints as SGLang documents them: docs.sglang.io/advanced_features/
server_arguments.html, basic_usage/native_api.html, references/production_metrics.html."""

from __future__ import annotations

from pydantic import field_validator

from reconciler.backends.kinds.base import (
    CHAT_FIELDS,
    OPENAI_FIELDS,
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
from reconciler.monitoring.promql import HB, RATE, quantiles

# SGLang's --kv-cache-dtype choices.
KV_CACHE_DTYPES = ("auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16", "fp4_e2m1")


class SGLangSettings(KindSettings):
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float = 0.9  # --mem-fraction-static

    @field_validator("kv_cache_dtype")
    @classmethod
    def _kv_cache_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in KV_CACHE_DTYPES:
            raise ValueError(
                f"{value!r} is not an SGLang KV cache type: use one of {', '.join(KV_CACHE_DTYPES)}"
            )
        return value


def launch(request: LaunchRequest) -> Launch:
    backend = request.backend
    # `binary`: the Python that has sglang installed (its own venv, usually).
    argv = [
        backend.binary or "python3", "-m", "sglang.launch_server",
        "--model-path", request.model_ref,
        "--host", backend.host,
        "--port", str(backend.port),
        "--served-model-name", request.model_name,
        "--context-length", str(backend.context_size),
        "--max-running-requests", str(backend.parallel),
        "--enable-metrics",
        "--enable-cache-report",  # cached_tokens in usage: checked by cache-aware routing
    ]  # fmt: skip
    if request.gpu_ids:
        argv += ["--tp", str(backend.tensor_parallel_size)]
        argv += ["--mem-fraction-static", str(backend.gpu_memory_utilization)]
    else:
        argv += ["--device", "cpu"]
    if backend.quantization:
        argv += ["--quantization", backend.quantization]
    if backend.kv_cache_dtype:
        argv += ["--kv-cache-dtype", backend.kv_cache_dtype]
    return with_backend_env(request, argv, {})


DASHBOARD = Dashboard(
    "tensorforge-sglang",
    "TensorForge / SGLang backends",
    [
        Panel(
            "Scrape up",
            [(f'up{{{HB}, kind="sglang"}}', "{{backend}}")],
            kind="stat",
            width=24,
            max=1,
        ),
        Panel(
            "Requests running / queued",
            [
                (f"sum by (backend) (sglang:num_running_reqs{{{HB}}})", "running {{backend}}"),
                (f"sum by (backend) (sglang:num_queue_reqs{{{HB}}})", "queued {{backend}}"),
            ],
        ),
        Panel(
            "KV pool usage / prefix cache hit rate",
            [
                (f"max by (backend) (sglang:token_usage{{{HB}}})", "usage {{backend}}"),
                (f"max by (backend) (sglang:cache_hit_rate{{{HB}}})", "hit rate {{backend}}"),
            ],
            "percentunit",
            max=1,
        ),
        Panel(
            "Time to first token (p50/p95/p99)",
            quantiles("sglang:time_to_first_token_seconds", "backend", HB),
            "s",
        ),
        Panel(
            "End-to-end latency (p50/p95/p99)",
            quantiles("sglang:e2e_request_latency_seconds", "backend", HB),
            "s",
        ),
        Panel(
            "Time per output token (p50/p95/p99)",
            quantiles("sglang:time_per_output_token_seconds", "backend", HB),
            "s",
        ),
        Panel(
            "Tokens per second (prompt / generation)",
            [
                (
                    f"sum by (backend) (rate(sglang:prompt_tokens_total{{{HB}}}[{RATE}]))",
                    "prompt {{backend}}",
                ),
                (
                    f"sum by (backend) (rate(sglang:generation_tokens_total{{{HB}}}[{RATE}]))",
                    "generation {{backend}}",
                ),
            ],
        ),
        Panel(
            "Generation throughput reported by the server (tokens/s)",
            [(f"sum by (backend) (sglang:gen_throughput{{{HB}}})", "{{backend}}")],
        ),
    ],
    backend_kind="sglang",
)

KIND = Kind(
    name="sglang",
    title="SGLang",
    settings=SGLangSettings,
    launch=launch,
    gateway=Gateway(
        adapter="reconciler.gateway.adapters.openai:OpenAIAdapter",
        embedding_hint="serve an embedding model with '--is-embedding' in backends.{name}.extra_args "
        "and set backends.{name}.capabilities to include 'embedding'",
        # top_k and min_p as extra body; its repetition_penalty has no rename here, so the
        # Ollama surface's repeat_penalty is refused rather than silently dropped.
        chat_fields=OPENAI_FIELDS | CHAT_FIELDS | THINK_FIELDS | {"top_k", "min_p"},
        text_fields=OPENAI_FIELDS | {"top_k", "min_p"},
    ),
    probe=Probe("GET", "/health", loading_status=503, model_list="/v1/models"),
    metrics=Metrics(
        load_series=("sglang:num_running_reqs", "sglang:num_queue_reqs"),
        kv_series=("sglang:token_usage",),
    ),
    dashboard=DASHBOARD,
    memory=Memory(weights="safetensors", reserved_fraction="gpu_memory_utilization"),
    shards=True,
)
