"""How much GPU memory a backend needs, estimated from the model file and the backend's settings.

GGUF (llama.cpp): the tensor bytes (equal to llama.cpp's logged model buffer), the f16 KV cache
(`n_ctx * n_layer * n_head_kv * (k + v) * 2` bytes, n_ctx being the total over all slots), the
output buffer and a compute-buffer allowance calibrated against llama.cpp's own log (docs/vram.md).
vLLM: the weights from the safetensors headers (FP8 = 1 byte per parameter), plus room for one
full-length sequence of KV cache, must fit inside `gpu_memory_utilization` of each GPU, and vLLM
reserves that whole share at start. Unknown models estimate to 0: placement then only counts GPUs."""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.config.schema import BackendSpec, ModelSpec
from reconciler.gpu.inventory import GpuInfo

log = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3
# CUDA context, cuBLAS workspaces and allocator slack per GPU process (not in llama.cpp's log).
CUDA_OVERHEAD_PER_GPU = 512 * MiB
# vLLM/TGI activations and CUDA graphs outside the KV cache, per GPU.
ACTIVATION_ALLOWANCE_PER_GPU = 2 * GiB
LLAMACPP_UBATCH = 512  # llama-server's default n_ubatch

# Bytes per element of the KV cache / weight dtypes people declare.
KV_DTYPE_BYTES = {
    None: 2.0, "f16": 2.0, "bf16": 2.0, "auto": 2.0, "f32": 4.0,
    "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32,
    "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0,
}  # fmt: skip
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class VramEstimate:
    """Bytes, in total over all of a backend's GPUs; `note` says what was assumed."""

    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    overhead: int = 0
    reserved: int = 0  # what the server takes regardless (vLLM's utilization share), if more
    note: str = ""

    @property
    def total(self) -> int:
        return max(self.weights + self.kv_cache + self.compute + self.overhead, self.reserved)


def estimate_vram(
    backend: BackendSpec,
    model: ModelSpec,
    path: str | Path | None,
    gpus: Sequence[GpuInfo] = (),
) -> VramEstimate:
    """The memory `backend` needs to serve `model` from `path` on `gpus` (the inventory)."""
    file = Path(path) if path else None
    if file is None or not file.exists():
        return VramEstimate(note="model not on disk yet; placement counts GPUs only")
    try:
        if backend.kind == "llamacpp" or (file.is_file() and file.suffix == ".gguf"):
            return estimate_gguf(backend, file)
        if backend.kind in ("vllm", "tgi"):
            return estimate_safetensors(backend, file, gpus)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("cannot estimate VRAM for %s: %s", file, exc)
        return VramEstimate(note=f"unreadable model metadata ({exc}); placement counts GPUs only")
    return VramEstimate(note=f"no estimate for kind {backend.kind}; placement counts GPUs only")


# -- GGUF / llama.cpp --------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFShape:
    tensor_bytes: int
    n_layer: int
    n_head_kv: int
    k_dim: int
    v_dim: int
    n_embd: int
    n_ff: int
    n_vocab: int


def read_gguf_shape(path: Path) -> GGUFShape:
    """The shape of a GGUF model; cached per file version, since the controller asks every pass
    and parsing a GGUF's metadata takes seconds (its vocabulary alone is ~50k strings)."""
    stat = path.stat()
    return _read_gguf_shape(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_gguf_shape(path: str, _mtime_ns: int, _size: int) -> GGUFShape:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str, default=None):
        found = reader.fields.get(key)
        return found.contents() if found is not None else default

    # The same reading as reconciler/models/gguf_info.py, with feed-forward and vocabulary
    # sizes added, from one parse of the file.
    arch = field("general.architecture", "unknown")
    heads = int(field(f"{arch}.attention.head_count", 1))
    n_embd = int(field(f"{arch}.embedding_length", 0))
    head_dim = n_embd // heads if heads else 0
    n_ff = field(f"{arch}.feed_forward_length", 4 * n_embd)
    if isinstance(n_ff, list):  # per-layer feed-forward sizes: take the largest
        n_ff = max(n_ff)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return GGUFShape(
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        n_layer=int(field(f"{arch}.block_count", 0)),
        n_head_kv=int(field(f"{arch}.attention.head_count_kv", heads)),
        k_dim=int(field(f"{arch}.attention.key_length", head_dim)),
        v_dim=int(field(f"{arch}.attention.value_length", head_dim)),
        n_embd=n_embd,
        n_ff=int(n_ff),
        n_vocab=len(tokens.data) if tokens is not None else 32000,
    )


def llamacpp_buffers(shape: GGUFShape, n_ctx: int, n_parallel: int, kv_dtype: str | None = None) -> dict[str, int]:
    """llama.cpp's model, KV, output and compute buffers in bytes (see docs/vram.md)."""
    n_ctx = math.ceil(n_ctx / 256) * 256  # llama.cpp pads the context to 256 cells
    n_ctx_seq = n_ctx // n_parallel  # each slot gets its share of the context
    kv_bytes = KV_DTYPE_BYTES.get(kv_dtype.lower() if kv_dtype else None, 2.0)
    kv = int(n_ctx * shape.n_layer * shape.n_head_kv * (shape.k_dim + shape.v_dim) * kv_bytes)
    output = shape.n_vocab * 4 * n_parallel  # f32 logits, one row per slot
    # Calibrated on SmolLM2 (docs/vram.md): activations for one micro-batch, plus the f16
    # attention mask over one slot's context.
    compute = 16 * LLAMACPP_UBATCH * (shape.n_embd + shape.n_ff) + 2 * LLAMACPP_UBATCH * n_ctx_seq
    return {"model": shape.tensor_bytes, "kv": kv, "output": output, "compute": compute}


def estimate_gguf(backend: BackendSpec, path: Path) -> VramEstimate:
    shape = read_gguf_shape(path)
    buffers = llamacpp_buffers(shape, backend.context_size, backend.parallel, backend.kv_cache_dtype)
    gpus = max(backend.gpus_wanted, 1)
    return VramEstimate(
        weights=buffers["model"],
        kv_cache=buffers["kv"],
        compute=buffers["compute"] + buffers["output"],
        overhead=CUDA_OVERHEAD_PER_GPU * gpus if backend.gpus_wanted else 0,
        note=f"GGUF, n_ctx {backend.context_size} over {backend.parallel} slot(s)",
    )


# -- safetensors / vLLM and TGI ----------------------------------------------------------------
def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * MiB:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        return json.loads(handle.read(length))


def safetensors_weights(path: Path) -> tuple[int, int]:
    """(parameter count, stored bytes) of a safetensors file or a directory of shards."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        index = path / "model.safetensors.index.json"
        if index.exists():  # shards not downloaded: the index still knows the total size
            total = int(json.loads(index.read_text())["metadata"]["total_size"])
            return total // 2, total
        raise ValueError(f"{path}: no *.safetensors files")
    params = stored = 0
    for file in files:
        for name, tensor in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = math.prod(tensor["shape"])
            params += count
            stored += count * SAFETENSORS_DTYPE_BYTES.get(tensor["dtype"], 2)
    return params, stored


def _kv_bytes_per_token(config: dict, kv_bytes: float) -> float:
    text = config.get("text_config", config)
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads", heads))
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * kv_bytes


def estimate_safetensors(backend: BackendSpec, path: Path, gpus: Sequence[GpuInfo]) -> VramEstimate:
    params, stored = safetensors_weights(path)
    fp8 = (backend.quantization or "").lower().startswith("fp8")
    weights = params if fp8 else stored  # on-the-fly FP8 holds one byte per parameter
    directory = path if path.is_dir() else path.parent
    kv = 0
    if (directory / "config.json").exists():
        config = json.loads((directory / "config.json").read_text())
        kv_dtype = (backend.kv_cache_dtype or "").lower() or None
        kv = int(_kv_bytes_per_token(config, KV_DTYPE_BYTES.get(kv_dtype, 2.0)) * backend.context_size)
    count = max(backend.gpus_wanted, 1)
    reserved = 0
    note = f"{params / 1e9:.1f}B parameters, {'FP8' if fp8 else 'stored dtype'} weights"
    if backend.kind == "vllm" and gpus:
        # vLLM claims gpu_memory_utilization of each GPU's total at start, whatever it needs.
        util = backend.gpu_memory_utilization
        share = util * max(g.memory_total for g in gpus)
        need = (weights + kv) / count + ACTIVATION_ALLOWANCE_PER_GPU
        # Weights and one full sequence must fit in the share; if not, the GPU would need
        # need/util in total, which placement then refuses against what is free.
        reserved = int(max(share, need / util)) * count
        note += f", vLLM reserves {util:.0%} of each GPU"
    return VramEstimate(
        weights=weights,
        kv_cache=kv,
        overhead=ACTIVATION_ALLOWANCE_PER_GPU * count,
        reserved=reserved,
        note=note,
    )
