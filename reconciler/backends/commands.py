"""The exact command line and environment each backend kind is started with.

One function per kind, shared by the process supervisor and the systemd templates, so that a
backend starts the same way under either driver. Flags are the real servers' own."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.config.schema import BackendSpec, ModelSpec, host_port
from reconciler.gpu.vram import prompt_cache_mib


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def model_reference(name: str, model: ModelSpec, local_path: str | None) -> str:
    """What the server is told to load: a local file when pulled, else the hub id or tag."""
    if local_path:
        return local_path
    scheme, _, rest = model.source.partition(":")
    return rest if scheme in ("hf", "ollama") else name


def gpu_env(gpu_ids: list[int]) -> dict[str, str]:
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, which is what a CPU backend wants.
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids)}


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


CACHE_REUSE_TOKENS = 256


def llamacpp_launch(
    name: str, backend: BackendSpec, model_name: str, model_ref: str, gpu_ids: list[int]
) -> Launch:
    binary = backend.binary or find_llama_server()
    common = [
        "--host", backend.host,
        "--port", str(backend.port),
        "--ctx-size", str(backend.context_size),
        "--parallel", str(backend.parallel),
        "--alias", model_name,
    ]  # fmt: skip
    if backend.threads:
        common += ["--threads", str(backend.threads)]
    if backend.flash_attn:
        common += ["--flash-attn", "on"]
    # Bounded host-memory prompt cache (llama.cpp's default, 8 GiB, grew without a ceiling).
    common += ["--cache-ram", str(prompt_cache_mib(backend, model_ref))]
    # A conversation's next turn reuses its slot's cache beyond the common prefix too (a
    # shifted chunk of at least this many tokens); the gateway's cache-aware routing sends it
    # back to that replica. cache_prompt (per request) is on by default.
    common += ["--cache-reuse", str(CACHE_REUSE_TOKENS)]
    ngl = ["--n-gpu-layers", "999" if gpu_ids else "0"]
    if binary:
        argv = [binary, "--model", model_ref, *common, *ngl, "--metrics", "--slots"]
    else:
        argv = [sys.executable, "-m", "reconciler.backends.llamacpp_server"]
        argv += ["--model", model_ref, *common, *ngl]
    return Launch(argv + list(backend.extra_args), {**gpu_env(gpu_ids), **backend.environment})


def find_vllm_python() -> str:
    """The interpreter of the vLLM CPU venv: TF_VLLM_VENV's (scripts/lib/vllm-venv.sh builds
    it outside the clone), else this one."""
    venv = os.environ.get("TF_VLLM_VENV")
    candidate = Path(venv) / "bin" / "python" if venv else None
    if candidate and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return sys.executable


def vllm_launch(
    name: str, backend: BackendSpec, model_name: str, model_ref: str, gpu_ids: list[int]
) -> Launch:
    common = [
        "--host", backend.host,
        "--port", str(backend.port),
        "--served-model-name", model_name,
        "--max-model-len", str(backend.context_size),
        "--max-num-seqs", str(backend.parallel),
    ]  # fmt: skip
    if not gpu_ids:
        return _vllm_cpu_launch(backend, model_ref, common)
    argv = [
        backend.binary or "vllm", "serve", model_ref, *common,
        "--tensor-parallel-size", str(backend.tensor_parallel_size),
        "--gpu-memory-utilization", str(backend.gpu_memory_utilization),
    ]  # fmt: skip
    if backend.quantization:
        argv += ["--quantization", backend.quantization]
    if backend.kv_cache_dtype:
        argv += ["--kv-cache-dtype", backend.kv_cache_dtype]
    return Launch(argv + list(backend.extra_args), {**gpu_env(gpu_ids), **backend.environment})


def _vllm_cpu_launch(backend: BackendSpec, model_ref: str, common: list[str]) -> Launch:
    """vLLM's CPU build: its `vllm` script fails under the `vllm-cpu` distribution name, so
    `binary` is the Python that has it; the API server module takes the model by --model only.
    Eager mode: compiling took 140-260 s at every start (its cache is not reused), eager 30-70 s."""
    python = backend.binary or find_vllm_python()
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_ref, *common]
    argv.append("--enforce-eager")
    if backend.quantization:
        argv += ["--quantization", backend.quantization]
    env = gpu_env([])
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
    return Launch(argv + list(backend.extra_args), {**env, **backend.environment})


def tgi_launch(
    name: str, backend: BackendSpec, model_name: str, model_ref: str, gpu_ids: list[int]
) -> Launch:
    argv = [
        backend.binary or "text-generation-launcher",
        "--model-id", model_ref,
        "--hostname", backend.host,
        "--port", str(backend.port),
        "--num-shard", str(backend.tensor_parallel_size),
        "--max-total-tokens", str(backend.context_size),
        "--max-input-tokens", str(max(1, backend.context_size - 1)),
        "--max-concurrent-requests", str(max(backend.parallel, 1)),
    ]  # fmt: skip
    if backend.quantization:
        argv += ["--quantize", backend.quantization]
    return Launch(argv + list(backend.extra_args), {**gpu_env(gpu_ids), **backend.environment})


def ollama_launch(
    name: str, backend: BackendSpec, model_name: str, model_ref: str, gpu_ids: list[int]
) -> Launch:
    env = {
        "OLLAMA_HOST": host_port(backend.host, backend.port),  # type: ignore[arg-type]
        "OLLAMA_NUM_PARALLEL": str(backend.parallel),
        "OLLAMA_CONTEXT_LENGTH": str(backend.context_size),
        "OLLAMA_MAX_LOADED_MODELS": str(backend.max_loaded_models or 1),
    }
    if backend.flash_attn:
        env["OLLAMA_FLASH_ATTENTION"] = "1"
    argv = [backend.binary or "ollama", "serve", *backend.extra_args]
    return Launch(argv, {**gpu_env(gpu_ids), **env, **backend.environment})


LAUNCHERS = {
    "llamacpp": llamacpp_launch,
    "vllm": vllm_launch,
    "tgi": tgi_launch,
    "ollama": ollama_launch,
}


def launch_for(
    name: str, backend: BackendSpec, model_name: str, model_ref: str, gpu_ids: list[int]
) -> Launch:
    return LAUNCHERS[backend.kind](name, backend, model_name, model_ref, gpu_ids)
