"""VRAM estimates (GGUF against llama.cpp's measured buffers, safetensors headers for vLLM) and
placement with injected inventories: eight 192 GB B200s, two small cards."""

from __future__ import annotations

import json
import logging
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.gguf_files import tiny_gguf

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
from reconciler.models.gguf_info import read_gguf_info

GiB = 1024**3
MiB = 1024**2


def b200s(used: dict[int, int] | None = None) -> StaticInventory:
    used = used or {}
    total = 192 * 10**9
    return StaticInventory(
        [
            GpuInfo(
                i, f"GPU-b200-{i}", "NVIDIA B200", total, used.get(i, 0), total - used.get(i, 0)
            )
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


def test_the_header_walk_reads_what_llama_cpps_own_reader_reads(smollm2_path: Path) -> None:
    """scan_gguf (what the shape and info are read from) against the gguf package's reader
    (read_gguf_file's parse, cached for the session): every metadata value, every array's
    length, the tensors' bytes and elements."""
    from reconciler.models.gguf_info import scan_gguf
    from reconciler.models.gguf_metadata import read_gguf_file

    header = scan_gguf(smollm2_path)
    metadata, tensor_bytes, parameters = read_gguf_file(smollm2_path)
    assert set(header.values) | set(header.array_lengths) == set(metadata)
    for key, value in metadata.items():
        if key in header.values:
            assert header.values[key] == pytest.approx(value), key
        else:  # a long array (tokens, merges): its length
            assert header.array_lengths[key] == len(value), key
    assert (header.tensor_bytes, header.parameter_count) == (tensor_bytes, parameters)


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
    estimate = estimate_vram(vllm, spec, llama70b)
    params, _ = safetensors_weights(llama70b)
    assert estimate.weights == params  # FP8: one byte per parameter
    # KV for one 32k sequence in fp8: 2 * 80 layers * 8 heads * 128 dims * 1 byte per token.
    assert estimate.kv_cache == 2 * 80 * 8 * 128 * 32768
    # Each of the 4 GPUs gives vLLM 90% of its own memory, whatever it needs.
    assert estimate.on_gpu(192 * 10**9, 4) == int(0.9 * 192 * 10**9)
    placed = place({"llama": vllm}, inventory.gpus(), {"llama": estimate})
    assert placed.assignments == {"llama": [0, 1, 2, 3]}


def test_vllm_weights_beyond_utilization_are_refused(llama70b: Path) -> None:
    spec = ModelSpec(source=f"path:{llama70b}", format="safetensors")
    vllm = BackendSpec(
        kind="vllm", model="m", port=9000, tensor_parallel_size=1, gpu_memory_utilization=0.5
    )
    inventory = b200s()
    estimate = estimate_vram(vllm, spec, llama70b)
    # 141 GB of BF16 weights do not fit in half of a 192 GB card.
    assert estimate.total > 0.5 * 192 * 10**9
    placed = place({"llama": vllm}, inventory.gpus(), {"llama": estimate})
    assert "llama" in placed.refused
    reason = placed.refused["llama"]
    assert reason.startswith(
        "GPU 0 (the most free) is too small: needs 134.7 GiB, 50% of its 178.8 GiB is 89.4 GiB"
    )
    assert reason.endswith("0 of the 1 GPU(s) wanted fit")
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
    assert placed.refused == {
        "x": "GPU 0 (the most free) has 10.0 GiB free, needs 11.0 GiB; 0 of the 1 GPU(s) wanted fit"
    }
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


def test_unreadable_gpus_keep_what_runs_on_them() -> None:
    """A GPU NVML could not read this pass is missing from the inventory, not gone: a backend
    running there stays (no move, no stop), and nothing new is put there."""
    readable = [GpuInfo(0, "GPU-a", "NVIDIA L4", 24 * GiB, 0, 24 * GiB)]
    backends = {"a": backend(gpus=1), "b": backend(port=9001, gpus=1, gpu_ids=[1])}
    placed = place(
        backends, readable, {"a": 16 * GiB, "b": GiB}, running={"a": [1]}, unreadable={1}
    )
    assert placed.assignments == {"a": [1]}
    assert placed.refused == {"b": "gpu_ids [1] could not be read this pass"}
    # Without the hint a running backend whose GPU vanished is moved (it really is gone).
    assert place(backends, readable, {"a": 16 * GiB}, running={"a": [1]}).assignments == {"a": [0]}


# -- hostile and unusual model files --------------------------------------------------------
def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf(tensors: int, kvs: int, body: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs) + body


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _kv_u32_array(key: str, values: list[int]) -> bytes:
    return (
        _s(key) + struct.pack("<IIQ", 9, 4, len(values)) + struct.pack(f"<{len(values)}I", *values)
    )


HOSTILE_GGUF = {
    # 65 bytes: one array KV declaring 2**62 items (GGUFReader loops and allocates for ever).
    "array": _gguf(0, 1, _s("x") + struct.pack("<IIQ", 9, 0, 1 << 62) + b"\0" * 16),
    "kv_count": _gguf(0, 1 << 60, _kv_u32("general.alignment", 32)),
    "string": _gguf(0, 1, struct.pack("<Q", 1 << 62) + b"abc" + b"\0" * 16),
    "tensor_count": _gguf(
        1 << 60, 1, _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    ),
}
HOSTILE_PROBE = """
import json, sys, time
from pathlib import Path
from reconciler.config.schema import BackendSpec, ModelSpec
from reconciler.gpu.vram import estimate_vram
from reconciler.models.gguf_info import read_gguf_info
out = {}
for name in sys.argv[1:]:
    path = Path(name)
    start = time.monotonic()
    try:
        read_gguf_info(path)
        error = "no error"
    except ValueError as exc:
        error = str(exc)
    b = BackendSpec(kind="llamacpp", model="m", port=9000, gpus=1)
    note = estimate_vram(b, ModelSpec(source=f"path:{path}"), path).note
    out[path.stem] = {"error": error, "note": note, "seconds": time.monotonic() - start}
print(json.dumps(out))
"""


def test_hostile_gguf_headers_fail_fast_with_a_clear_error(tmp_path: Path) -> None:
    """GGUFReader trusts the header's counts: an array of 2**62 items, 2**60 metadata pairs or
    tensors, a 2**62-byte string made it loop and allocate without bound, hanging every
    reconcile pass. A bounded pre-scan refuses them at once. Run in a child process with a
    memory limit and a timeout, so that a regression fails here instead of eating the host."""
    files = []
    for name, data in HOSTILE_GGUF.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        files.append(str(tmp_path / f"{name}.gguf"))
    assert len(HOSTILE_GGUF["array"]) == 65

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * GiB, 4 * GiB))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", HOSTILE_PROBE, *files], capture_output=True, text=True,
        timeout=60, preexec_fn=limit, env=env, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout)
    for name in HOSTILE_GGUF:
        path = tmp_path / f"{name}.gguf"
        assert got[name]["error"].startswith(f"{path}: not a usable GGUF: "), got[name]
        assert got[name]["note"].startswith("unreadable model metadata"), got[name]
        assert got[name]["seconds"] < 2, got[name]
    assert "array of 4611686018427387904" in got["array"]["error"]
    assert "1152921504606846976 declared" in got["kv_count"]["error"]


def test_a_per_layer_head_count_gguf_is_estimated_layer_by_layer(tmp_path: Path) -> None:
    """Jamba, LFM2, OpenELM and Nemotron-51B store attention.head_count(_kv) as one value per
    layer: int() of the list raised TypeError, failing every pass. The KV cache is the sum over
    layers of n_head_kv * head_dim (k and v), head_dim being each layer's embedding / n_head;
    a layer with no KV heads (Mamba, convolution) holds no cache."""
    body = (
        _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
        + _kv_u32("llama.block_count", 3)
        + _kv_u32("llama.embedding_length", 256)
        + _kv_u32_array("llama.attention.head_count", [4, 4, 8])
        + _kv_u32_array("llama.attention.head_count_kv", [2, 0, 8])
    )  # fmt: skip
    path = tmp_path / "hybrid.gguf"
    path.write_bytes(_gguf(0, 5, body))
    per_token = 2 * (64 + 64) + 0 + 8 * (32 + 32)  # elements over the three layers
    estimate = estimate_vram(
        backend(gpus=1, context_size=1024), ModelSpec(source=f"path:{path}"), path
    )
    assert estimate.kv_cache == 1024 * per_token * 2  # f16
    info = read_gguf_info(path)
    assert (info.head_count, info.head_count_kv) == (8, 8)  # the largest, for display
    assert info.kv_cache_bytes(1024) == estimate.kv_cache


def test_malformed_model_files_give_an_unreadable_estimate_logged_once(
    tmp_path: Path, caplog
) -> None:
    """A truncated GGUF (IndexError), a safetensors file shorter than its 8-byte length
    (struct.error) or with a JSON list for a header (AttributeError) escaped estimate_vram and
    failed every reconcile pass. Now each is that backend's "unreadable" estimate, and the
    warning is said once, not every pass."""
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(tiny_gguf(tmp_path / "whole.gguf", rows=8)[:100])  # cut inside the header
    short = tmp_path / "short"
    short.mkdir()
    (short / "model.safetensors").write_bytes(b"\x01\x02")
    listed = tmp_path / "listed"
    listed.mkdir()
    raw = json.dumps([1, 2]).encode()
    (listed / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    vllm = BackendSpec(kind="vllm", model="m", port=9000, gpus=1)
    cases = [(backend(gpus=1), gguf), (vllm, short), (vllm, listed)]
    with caplog.at_level(logging.WARNING, logger="reconciler.gpu.vram"):
        for _ in range(3):  # three passes
            for spec, path in cases:
                estimate = estimate_vram(spec, ModelSpec(source=f"path:{path}"), path)
                assert estimate.total == 0 and estimate.note.startswith("unreadable model metadata")
    for _, path in cases:
        assert caplog.text.count(f"cannot estimate VRAM for {path}:") == 1
    assert "not a usable GGUF" in caplog.text
    assert "shorter than a safetensors header" in caplog.text
    assert "header is not a JSON object" in caplog.text


def test_config_nulls_fall_back_to_defaults(tmp_path: Path) -> None:
    """`"num_key_value_heads": null` (as some configs write it) raised TypeError from int(None);
    a null means the default, as a missing key does: one KV head per attention head."""
    write_safetensors(tmp_path / "model.safetensors", {"w": ("BF16", [1024, 1024])})
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": None,
              "hidden_size": 256, "head_dim": None}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    vllm = BackendSpec(kind="vllm", model="m", port=9000, gpus=1, context_size=1000)
    estimate = estimate_vram(vllm, ModelSpec(source=f"path:{tmp_path}"), tmp_path)
    assert estimate.weights == 2 * 1024 * 1024
    assert estimate.kv_cache == 2 * 2 * 4 * 64 * 2 * 1000  # k+v, layers, heads, head_dim, bf16


def test_vllm_share_is_of_each_gpus_own_memory(tmp_path: Path) -> None:
    """vLLM's reservation was gpu_memory_utilization times the largest GPU on the host, so a
    2 GiB model next to a busy A100-80G could not go on a free 24 GiB RTX 4090 (90% of 80 GiB
    does not fit in 24). Each GPU is tested against its own share."""
    write_safetensors(tmp_path / "model.safetensors", {"w": ("BF16", [1024, 1024 * 1024])})  # 2 GiB
    config = {
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "hidden_size": 2048,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    gpus = [
        GpuInfo(0, "GPU-a100", "NVIDIA A100-SXM4-80GB", 80 * GiB, 70 * GiB, 10 * GiB),
        GpuInfo(1, "GPU-4090", "NVIDIA GeForce RTX 4090", 24 * GiB, 0, 24 * GiB),
    ]
    vllm = BackendSpec(kind="vllm", model="m", port=9000, gpus=1)
    estimate = estimate_vram(
        vllm, ModelSpec(source=f"path:{tmp_path}", format="safetensors"), tmp_path
    )
    placed = place({"v": vllm}, gpus, {"v": estimate})
    assert placed.assignments == {"v": [1]} and placed.refused == {}
    # Running there, it is credited its share of that card back and stays.
    busy = [gpus[0], GpuInfo(1, "GPU-4090", "NVIDIA GeForce RTX 4090", 24 * GiB, 22 * GiB, 2 * GiB)]
    assert place({"v": vllm}, busy, {"v": estimate}, running={"v": [1]}).assignments == {"v": [1]}


def test_vllm_weights_split_over_shards_not_gpus(tmp_path: Path) -> None:
    """With more GPUs than tensor-parallel shards vLLM still loads each shard's whole part on
    one GPU; dividing by the GPUs given halved an 80 GiB model onto two 48 GiB cards, and it
    then failed to load. The schema refuses gpus > tensor_parallel_size for vllm/tgi; a spec
    that skipped validation still gets the honest estimate."""
    write_safetensors(
        tmp_path / "model.safetensors", {"w": ("BF16", [40 * 1024, 1024 * 1024])}
    )  # 80 GiB
    spec = ModelSpec(source=f"path:{tmp_path}", format="safetensors")
    cards = [GpuInfo(i, f"GPU-{i}", "NVIDIA L40S", 48 * GiB, 0, 48 * GiB) for i in range(2)]
    valid = BackendSpec(kind="vllm", model="m", port=9000, tensor_parallel_size=2)
    unsharded = BackendSpec.model_construct(
        **{**valid.model_dump(), "gpus": 2, "tensor_parallel_size": 1}
    )
    assert unsharded.gpus_wanted == 2
    split = estimate_vram(valid, spec, tmp_path)
    whole = estimate_vram(unsharded, spec, tmp_path)
    assert split.per_gpu(2) == -(-(80 * GiB + 2 * ACTIVATION_ALLOWANCE_PER_GPU) // 2)
    assert whole.per_gpu(2) == 80 * GiB + ACTIVATION_ALLOWANCE_PER_GPU  # one shard: all of it
    assert "v" in place({"v": unsharded}, cards, {"v": whole}).refused
    assert place({"v": valid}, cards, {"v": split}).assignments == {"v": [0, 1]}


def test_an_index_counts_only_its_shards(tmp_path: Path) -> None:
    """Mistral repositories ship consolidated.safetensors beside the HF shards: counting every
    *.safetensors counted the weights twice. With model.safetensors.index.json only the files
    its weight_map names count; a shard not downloaded yet falls back to its total_size."""
    write_safetensors(tmp_path / "consolidated.safetensors", {"layers.0.w": ("BF16", [4096, 4096])})
    write_safetensors(
        tmp_path / "model-00001-of-00002.safetensors", {"model.layers.0.w": ("BF16", [4096, 4096])}
    )
    write_safetensors(
        tmp_path / "model-00002-of-00002.safetensors", {"model.layers.1.w": ("BF16", [4096, 4096])}
    )
    index = {
        "metadata": {"total_size": 2 * 4096 * 4096 * 2},
        "weight_map": {
            "model.layers.0.w": "model-00001-of-00002.safetensors",
            "model.layers.1.w": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert safetensors_weights(tmp_path) == (2 * 4096 * 4096, 2 * 4096 * 4096 * 2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert safetensors_weights(tmp_path) == (2 * 4096 * 4096, 2 * 4096 * 4096 * 2)
