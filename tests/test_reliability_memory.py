"""Issue 14, finding 9: the embedded llama.cpp server's memory grew from 200 MiB to 3.8 GiB.
The cause is llama-server's host-memory prompt cache (--cache-ram, 8192 MiB by default, as
xllamacpp's CommonParams.cache_ram_mib shows): every distinct prompt's slot state is saved
in RAM for reuse. The launch line now bounds it from the desired state (cache_ram_mib, by
default the KV cache's own size) and the memory estimate counts it."""

from __future__ import annotations

from reconciler.backends.commands import launch_for
from reconciler.config.schema import BackendSpec
from reconciler.gpu.vram import MIB, estimate_gguf, llamacpp_buffers, read_gguf_shape


def cache_ram(argv: list[str]) -> int:
    return int(argv[argv.index("--cache-ram") + 1])


def test_the_prompt_cache_is_bounded_by_the_desired_state(smollm2_path):
    backend = BackendSpec(kind="llamacpp", model="m", port=9000, context_size=4096, parallel=2)
    kv = llamacpp_buffers(read_gguf_shape(smollm2_path), 4096, 2)["kv"]
    for binary in (None, "/usr/bin/llama-server"):  # the embedded server and llama-server alike
        launch = launch_for(
            "b", backend.model_copy(update={"binary": binary}), "m", str(smollm2_path), []
        )
        assert cache_ram(launch.argv) == -(-kv // MIB)  # one KV cache's worth, not 8 GiB
    off = launch_for(
        "b", backend.model_copy(update={"cache_ram_mib": 0}), "m", str(smollm2_path), []
    )
    assert cache_ram(off.argv) == 0


def test_the_memory_estimate_counts_the_prompt_cache(smollm2_path):
    cpu = BackendSpec(kind="llamacpp", model="m", port=9000, context_size=4096, cache_ram_mib=300)
    estimate = estimate_gguf(cpu, smollm2_path)
    assert estimate.prompt_cache == 300 * MIB
    assert estimate.host_memory == estimate.total + 300 * MIB
    assert "prompt cache 300 MiB in RAM" in estimate.note
    gpu = estimate_gguf(cpu.model_copy(update={"gpus": 1}), smollm2_path)
    assert gpu.host_memory == 300 * MIB  # weights and KV cache are the GPU's; the cache is RAM


def test_the_embedded_server_takes_the_flag():
    from reconciler.backends.llamacpp_server import parse_args

    assert parse_args(["--model", "x.gguf", "--cache-ram", "64"]).cache_ram == 64
    assert parse_args(["--model", "x.gguf"]).cache_ram == -1  # llama.cpp's own default
