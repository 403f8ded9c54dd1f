"""VRAM estimates (GGUF against llama.cpp's measured buffers, safetensors headers for vLLM) and
placement with injected inventories: eight 192 GB B200s, two small cards."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from reconciler.config.schema import BackendSpec, ModelSpec
from reconciler.gpu.inventory import GpuInfo, StaticInventory
from reconciler.gpu.placement import place
from reconciler.gpu.vram import (
    ACTIVATION_ALLOWANCE_PER_GPU,
    estimate_vram,
    llamacpp_buffers,
    read_gguf_shape,
    safetensors_weights,
)

GiB = 1024**3
MiB = 1024**2


def b200s(used: dict[int, int] | None = None) -> StaticInventory:
    used = used or {}
    total = 192 * 10**9
    return StaticInventory(
        [
            GpuInfo(i, f"GPU-b200-{i}", "NVIDIA B200", total, used.get(i, 0), total - used.get(i, 0))
            for i in range(8)
        ]
    )


def small_cards() -> StaticInventory:
    return StaticInventory(
        [
            GpuInfo(0, "GPU-a", "NVIDIA RTX A2000", 12 * GiB, 2 * GiB, 10 * GiB),
            GpuInfo(1, "GPU-b", "NVIDIA T4", 16 * GiB, 8 * GiB, 8 * GiB),
        ]
    )


def backend(**kw) -> BackendSpec:
    return BackendSpec(**{"kind": "llamacpp", "model": "m", "port": 9000, **kw})


# -- GGUF ----------------------------------------------------------------------------------
# What llama.cpp (xllamacpp, verbosity 4) logged loading SmolLM2 on CPU; docs/vram.md.
MEASURED = {  # (n_ctx, n_parallel): (model, kv, output, compute) MiB
    (512, 1): (92.10, 11.25, 0.19, 15.14),
    (2048, 1): (92.10, 45.00, 0.19, 16.64),
    (2048, 2): (92.10, 45.00, 0.38, 15.64),
    (4096, 2): (92.10, 90.00, 0.38, 16.64),
    (8192, 4): (92.10, 180.00, 0.75, 16.64),
    (16384, 1): (92.10, 360.00, 0.19, 30.64),
}


@pytest.fixture(scope="module")
def smollm2_shape(smollm2_path: Path):
    return read_gguf_shape(smollm2_path)


@pytest.mark.parametrize("n_ctx,n_parallel", sorted(MEASURED))
def test_gguf_buffers_match_llamacpp(smollm2_shape, n_ctx: int, n_parallel: int) -> None:
    model, kv, output, compute = MEASURED[(n_ctx, n_parallel)]
    got = llamacpp_buffers(smollm2_shape, n_ctx, n_parallel)
    assert got["model"] / MiB == pytest.approx(model, abs=0.01)
    assert got["kv"] / MiB == pytest.approx(kv, abs=0.01)
    assert got["output"] / MiB == pytest.approx(output, abs=0.01)
    # The compute allowance is an upper bound within 2 MiB of what llama.cpp reserved.
    assert compute <= got["compute"] / MiB <= compute + 2


def test_gguf_estimate_adds_cuda_overhead_on_gpu(smollm2_path: Path) -> None:
    spec = ModelSpec(source=f"path:{smollm2_path}")
    cpu = estimate_vram(backend(context_size=2048, parallel=2), spec, smollm2_path)
    gpu = estimate_vram(backend(context_size=2048, parallel=2, gpus=1), spec, smollm2_path)
    assert cpu.overhead == 0 and gpu.overhead > 0
    assert gpu.total - cpu.total == gpu.overhead
    assert cpu.kv_cache == 45 * MiB


def test_missing_model_estimates_zero(tmp_path: Path) -> None:
    estimate = estimate_vram(backend(gpus=1), ModelSpec(source="hf:org/m"), tmp_path / "nope")
    assert estimate.total == 0 and "not on disk" in estimate.note


# -- safetensors / vLLM --------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
        for name, (dtype, shape) in tensors.items()
    }
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)  # header only: sizes come from it


@pytest.fixture
def llama70b(tmp_path: Path) -> Path:
    """A 70B-shaped BF16 checkpoint: headers only, 80 layers of 8192-wide GQA blocks."""
    directory = tmp_path / "llama-70b"
    directory.mkdir()
    per_layer = {
        "q": [8192, 8192], "k": [1024, 8192], "v": [1024, 8192], "o": [8192, 8192],
        "gate": [28672, 8192], "up": [28672, 8192], "down": [8192, 28672],
    }  # fmt: skip
    for shard in range(2):
        tensors = {
            f"model.layers.{layer}.{name}.weight": ("BF16", shape)
            for layer in range(shard * 40, shard * 40 + 40)
            for name, shape in per_layer.items()
        }
        if shard == 0:
            tensors["model.embed_tokens.weight"] = ("BF16", [128256, 8192])
            tensors["lm_head.weight"] = ("BF16", [128256, 8192])
        write_safetensors(directory / f"model-0000{shard + 1}-of-00002.safetensors", tensors)
    config = {
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "hidden_size": 8192,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_safetensors_weights_from_headers(llama70b: Path) -> None:
    params, stored = safetensors_weights(llama70b)
    assert 70.0e9 < params < 71.0e9
    assert stored == 2 * params


def test_vllm_fp8_reserves_its_share_of_each_gpu(llama70b: Path) -> None:
    spec = ModelSpec(source=f"path:{llama70b}", format="safetensors")
    vllm = BackendSpec(
        kind="vllm", model="m", port=9000, tensor_parallel_size=4, quantization="fp8",
        kv_cache_dtype="fp8", context_size=32768, gpu_memory_utilization=0.9,
    )  # fmt: skip
    inventory = b200s()
    estimate = estimate_vram(vllm, spec, llama70b, inventory.gpus())
    params, _ = safetensors_weights(llama70b)
    assert estimate.weights == params  # FP8: one byte per parameter
    # KV for one 32k sequence in fp8: 2 * 80 layers * 8 heads * 128 dims * 1 byte per token.
    assert estimate.kv_cache == 2 * 80 * 8 * 128 * 32768
    assert estimate.total == int(0.9 * 192 * 10**9) * 4
    placed = place({"llama": vllm}, inventory.gpus(), {"llama": estimate.total})
    assert placed.assignments == {"llama": [0, 1, 2, 3]}


def test_vllm_weights_beyond_utilization_are_refused(llama70b: Path) -> None:
    spec = ModelSpec(source=f"path:{llama70b}", format="safetensors")
    vllm = BackendSpec(kind="vllm", model="m", port=9000, tensor_parallel_size=1, gpu_memory_utilization=0.5)
    inventory = b200s()
    estimate = estimate_vram(vllm, spec, llama70b, inventory.gpus())
    # 141 GB of BF16 weights do not fit in half of a 192 GB card.
    assert estimate.total > 0.5 * 192 * 10**9
    placed = place({"llama": vllm}, inventory.gpus(), {"llama": estimate.total})
    assert "llama" in placed.refused
    reason = placed.refused["llama"]
    assert reason.startswith("GPU ") and "free, needs" in reason and "GiB" in reason
    assert estimate.overhead == ACTIVATION_ALLOWANCE_PER_GPU


# -- placement ------------------------------------------------------------------------------
def test_eight_b200s_pack_tensor_parallel_and_single_gpu_backends() -> None:
    gpus = b200s().gpus()
    backends = {
        "big": BackendSpec(kind="vllm", model="m", port=9001, tensor_parallel_size=4),
        "mid": BackendSpec(kind="tgi", model="m", port=9002, tensor_parallel_size=2),
        "small": backend(port=9003, gpus=1),
    }
    estimates = {"big": 4 * 170 * 10**9, "mid": 2 * 100 * 10**9, "small": 20 * 10**9}
    placed = place(backends, gpus, estimates)
    assert placed.refused == {}
    assert len(placed.assignments["big"]) == 4 and len(placed.assignments["mid"]) == 2
    used = [i for ids in placed.assignments.values() for i in ids]
    # Best fit: "small" takes the 22 GB left on one of big's GPUs; two B200s stay empty.
    assert len(set(used)) == 6
    assert placed.assignments["small"][0] in placed.assignments["big"]


def test_small_cards_refuse_with_gpu_and_numbers() -> None:
    gpus = small_cards().gpus()
    placed = place({"x": backend(gpus=1)}, gpus, {"x": 11 * GiB})
    assert placed.refused == {"x": "GPU 0 (the most free) has 10.0 GiB free, needs 11.0 GiB; 0 of the 1 GPU(s) wanted fit"}
    placed = place({"x": backend(gpus=1, gpu_ids=[1])}, gpus, {"x": 9 * GiB})
    assert placed.refused == {"x": "GPU 1: needs 9.0 GiB, 8.0 GiB free"}
    placed = place({"x": backend(gpus=1)}, gpus, {"x": 9 * GiB})
    assert placed.assignments == {"x": [0]}
    placed = place({"x": backend(gpus=1)}, [], {"x": GiB})
    assert "this host has none" in placed.refused["x"]


def test_a_running_backend_is_credited_its_memory_and_keeps_its_gpus() -> None:
    """NVML's free memory already excludes what a running backend holds: placing it again
    without crediting that back moves it (a restart) or refuses it (a stop), pass after pass."""
    cards = lambda used0, used1: [  # noqa: E731
        GpuInfo(0, "GPU-a", "NVIDIA L4", 24 * GiB, used0, 24 * GiB - used0),
        GpuInfo(1, "GPU-b", "NVIDIA A100", 40 * GiB, used1, 40 * GiB - used1),
    ]
    backends = {"a": backend(gpus=1), "b": backend(port=9001, gpus=1)}
    estimates = {"a": 16 * GiB, "b": 20 * GiB}
    assert place({"a": backends["a"]}, cards(0, 0), estimates).assignments == {"a": [0]}
    # a runs on GPU 0. b, new and bigger, would best-fit there (a credited back): a stays.
    placed = place(backends, cards(16 * GiB, 0), estimates, running={"a": [0]})
    assert placed.assignments == {"a": [0], "b": [1]} and placed.refused == {}
    # On a single card a still fits beside itself.
    placed = place({"a": backends["a"]}, cards(16 * GiB, 0)[:1], estimates, running={"a": [0]})
    assert placed.assignments == {"a": [0]}
    # Grown past its card, it moves.
    placed = place({"a": backends["a"]}, cards(16 * GiB, 0), {"a": 30 * GiB}, running={"a": [0]})
    assert placed.assignments == {"a": [1]}
