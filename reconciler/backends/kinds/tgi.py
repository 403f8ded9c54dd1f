"""HuggingFace text-generation-inference: `text-generation-launcher` with one shard per GPU;
chat through its Messages API, text completions through its native /generate (the gateway's
TGI adapter translates); its /info says how many requests it takes at once."""

from __future__ import annotations

from reconciler.backends.kinds.base import (
    CHAT_FIELDS,
    OPENAI_FIELDS,
    Gateway,
    Kind,
    KindSettings,
    Launch,
    LaunchRequest,
    Memory,
    Metrics,
    with_backend_env,
)
from reconciler.monitoring.grafana import Dashboard, Panel
from reconciler.monitoring.promql import HB, RATE, quantiles


class TGISettings(KindSettings):
    tensor_parallel_size: int = 1
    quantization: str | None = None


def launch(request: LaunchRequest) -> Launch:
    backend = request.backend
    argv = [
        backend.binary or "text-generation-launcher",
        "--model-id", request.model_ref,
        "--hostname", backend.host,
        "--port", str(backend.port),
        "--num-shard", str(backend.tensor_parallel_size),
        "--max-total-tokens", str(backend.context_size),
        "--max-input-tokens", str(max(1, backend.context_size - 1)),
        "--max-concurrent-requests", str(max(backend.parallel, 1)),
    ]  # fmt: skip
    if backend.quantization:
        argv += ["--quantize", backend.quantization]
    return with_backend_env(request, argv, {})


DASHBOARD = Dashboard(
    "tensorforge-tgi",
    "TensorForge / TGI backends",
    [
        Panel(
            "Scrape up", [(f'up{{{HB}, kind="tgi"}}', "{{backend}}")], kind="stat", width=24, max=1
        ),
        Panel(
            "Requests per second (all / successful)",
            [
                (f"sum by (backend) (rate(tgi_request_count{{{HB}}}[{RATE}]))", "all {{backend}}"),
                (
                    f"sum by (backend) (rate(tgi_request_success{{{HB}}}[{RATE}]))",
                    "successful {{backend}}",
                ),
            ],
            "reqps",
        ),
        Panel(
            "Queue size / current batch size",
            [
                (f"sum by (backend) (tgi_queue_size{{{HB}}})", "queue {{backend}}"),
                (f"sum by (backend) (tgi_batch_current_size{{{HB}}})", "batch {{backend}}"),
            ],
        ),
        Panel(
            "Request latency (p50/p95/p99)", quantiles("tgi_request_duration", "backend", HB), "s"
        ),
        Panel(
            "Queue time (p50/p95/p99)", quantiles("tgi_request_queue_duration", "backend", HB), "s"
        ),
        Panel(
            "Time per output token (p50/p95/p99)",
            quantiles("tgi_request_mean_time_per_token_duration", "backend", HB),
            "s",
        ),
        Panel(
            "Tokens per second (input / generated)",
            [
                (
                    f"sum by (backend) (rate(tgi_request_input_length_sum{{{HB}}}[{RATE}]))",
                    "input {{backend}}",
                ),
                (
                    f"sum by (backend) (rate(tgi_request_generated_tokens_sum{{{HB}}}[{RATE}]))",
                    "generated {{backend}}",
                ),
            ],
        ),
        Panel(
            "Batch max tokens",
            [(f"max by (backend) (tgi_batch_current_max_tokens{{{HB}}})", "{{backend}}")],
        ),
    ],
    backend_kind="tgi",
)

KIND = Kind(
    name="tgi",
    title="TGI",
    settings=TGISettings,
    launch=launch,
    gateway=Gateway(
        adapter="reconciler.gateway.adapters.tgi:TGIAdapter",
        embedding_hint="TGI does not serve embeddings; run text-embeddings-inference and declare it "
        "with kind 'tgi' and capabilities: [embedding]",
        # The Messages API takes only OpenAI's fields; /generate takes top_k, typical_p and
        # repetition_penalty (but no presence_penalty).
        chat_fields=OPENAI_FIELDS | CHAT_FIELDS,
        text_fields=(OPENAI_FIELDS - {"presence_penalty"})
        | {"top_k", "typical_p", "repeat_penalty"},
    ),
    metrics=Metrics(load_series=("tgi_queue_size", "tgi_batch_current_size")),
    dashboard=DASHBOARD,
    memory=Memory(weights="safetensors"),
    shards=True,
)
