"""How much GPU memory a backend needs, estimated from the model file and the backend's settings.

GGUF (llama.cpp): the tensor bytes (equal to llama.cpp's logged model buffer), the f16 KV cache
(`n_ctx * n_layer * n_head_kv * (k + v) * 2` bytes, summed layer by layer when head counts are
per layer, n_ctx being the total over all slots), the output buffer and a compute-buffer
allowance calibrated against llama.cpp's own log (docs/vram.md).
vLLM: the weights from the safetensors headers (FP8 = 1 byte per parameter), split over the
tensor-parallel shards, plus room for one full-length sequence of KV cache, must fit inside
`gpu_memory_utilization` of each GPU, and vLLM reserves that whole share at start: a fraction of
each GPU's own memory, which placement tests GPU by GPU. Unknown or unreadable models estimate
to 0: placement then only counts GPUs."""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from reconciler.backends.registry import kind_of
from reconciler.config.schema import BackendSpec, ModelSpec

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
    reserved: int = 0  # what the server takes regardless, if more
    note: str = ""
    # vLLM takes this fraction of each GPU's own memory at start, whatever it needs: on mixed
    # cards that is a different number per GPU, so it cannot be folded into `total`.
    gpu_fraction: float = 0.0
    shards: int = 0  # the GPUs the model is split over (tensor_parallel_size); 0: all it gets
    # Host memory beside the GPUs': llama.cpp's prompt cache (--cache-ram), which holds saved
    # slot states in RAM whatever runs on the GPU. Not part of `total` (GPU memory).
    prompt_cache: int = 0
    cpu: bool = False  # runs without a GPU: weights, KV cache and compute are RAM too

    @property
    def host_memory(self) -> int:
        """RAM the server needs: its prompt cache, plus everything else when on the CPU."""
        return self.prompt_cache + (self.total if self.cpu else 0)

    @property
    def total(self) -> int:
        return max(self.weights + self.kv_cache + self.compute + self.overhead, self.reserved)

    def per_gpu(self, count: int) -> int:
        """What each of `count` GPUs must hold: the total split over the shards (vLLM/TGI's
        tensor_parallel_size; a GPU beyond them takes no part of it), else over the GPUs."""
        return -(-self.total // max(self.shards or count, 1))

    def on_gpu(self, memory_total: int, count: int) -> int | None:
        """Bytes that must be free on one of `count` GPUs with `memory_total` bytes, or None when
        the backend cannot run on such a GPU at all (it needs more than its share of the card)."""
        need = self.per_gpu(count)
        if not self.gpu_fraction:
            return need
        share = int(self.gpu_fraction * memory_total)
        return share if need <= share else None


def estimate_vram(backend: BackendSpec, model: ModelSpec, path: str | Path | None) -> VramEstimate:
    """The memory `backend` needs to serve `model` from `path`. vLLM's share depends on each
    GPU's size, which placement tests GPU by GPU (`VramEstimate.on_gpu`)."""
    file = Path(path) if path else None
    try:
        if file is None or not file.exists():
            return VramEstimate(note="model not on disk yet; placement counts GPUs only")
        weights = kind_of(backend.kind).memory.weights  # the format the kind's server loads
        if weights == "gguf" or (file.is_file() and file.suffix == ".gguf"):
            estimate = estimate_gguf(backend, file)
        elif weights == "safetensors":
            estimate = estimate_safetensors(backend, file)
        else:
            return VramEstimate(
                note=f"no estimate for kind {backend.kind}; placement counts GPUs only"
            )
    except Exception as exc:  # any malformed file (truncated, wrong JSON shape, nulls): this
        # backend's estimate, never a failed reconcile pass for every backend
        _warn_once(file, exc)
        return VramEstimate(note=f"unreadable model metadata ({exc}); placement counts GPUs only")
    _unreadable.pop(str(file), None)  # fixed: say so again if it breaks again
    return estimate


_unreadable: dict[str, str] = {}  # file -> the problem last logged for it


def _warn_once(file: Path | None, exc: Exception) -> None:
    """Once per file and problem: the controller estimates every pass."""
    problem = f"{type(exc).__name__}: {exc}"
    if _unreadable.get(str(file)) != problem:
        _unreadable[str(file)] = problem
        log.warning("cannot estimate VRAM for %s: %s", file, problem)


# -- GGUF / llama.cpp --------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFShape:
    tensor_bytes: int
    n_layer: int
    n_head_kv: int  # per-layer head counts: the largest (kv_per_token has the exact sum)
    k_dim: int
    v_dim: int
    n_embd: int
    n_ff: int
    n_vocab: int
    kv_per_token: int = 0  # KV elements per token: sum over layers of n_head_kv * (k + v)


def read_gguf_shape(path: Path) -> GGUFShape:
    """The shape of a GGUF model, from the header alone; cached per file version, since the
    controller asks every pass."""
    stat = path.stat()
    return _read_gguf_shape(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_gguf_shape(path: str, _mtime_ns: int, _size: int) -> GGUFShape:
    from reconciler.models.gguf_info import read_attention, scan_gguf

    header = scan_gguf(path)  # bounded: every length in the header checked against the file

    def field(key: str, default=None):
        return header.values.get(key, default)

    # The same reading as reconciler/models/gguf_info.py, with feed-forward and vocabulary
    # sizes added, from one walk of the header.
    arch = field("general.architecture", "unknown")
    n_embd = int(field(f"{arch}.embedding_length", 0))
    n_layer = int(field(f"{arch}.block_count", 0))
    attention = read_attention(field, arch, n_layer, n_embd)  # scalar or per layer
    n_ff = field(f"{arch}.feed_forward_length", 4 * n_embd)
    if isinstance(n_ff, list):  # per-layer feed-forward sizes: take the largest
        n_ff = max(n_ff, default=0)
    return GGUFShape(
        tensor_bytes=header.tensor_bytes,
        n_layer=n_layer,
        n_head_kv=attention.head_count_kv,
        k_dim=attention.key_length,
        v_dim=attention.value_length,
        n_embd=n_embd,
        n_ff=int(n_ff),
        n_vocab=header.array_lengths.get("tokenizer.ggml.tokens", 32000),
        kv_per_token=attention.kv_elements_per_token,
    )


def llamacpp_buffers(
    shape: GGUFShape, n_ctx: int, n_parallel: int, kv_dtype: str | None = None
) -> dict[str, int]:
    """llama.cpp's model, KV, output and compute buffers in bytes (see docs/vram.md)."""
    n_ctx = math.ceil(n_ctx / 256) * 256  # llama.cpp pads the context to 256 cells
    n_ctx_seq = n_ctx // n_parallel  # each slot gets its share of the context
    kv_bytes = KV_DTYPE_BYTES.get(kv_dtype.lower() if kv_dtype else None, 2.0)
    kv = int(n_ctx * shape.kv_per_token * kv_bytes)
    output = shape.n_vocab * 4 * n_parallel  # f32 logits, one row per slot
    # Calibrated on SmolLM2 (docs/vram.md): activations for one micro-batch, plus the f16
    # attention mask over one slot's context.
    compute = 16 * LLAMACPP_UBATCH * (shape.n_embd + shape.n_ff) + 2 * LLAMACPP_UBATCH * n_ctx_seq
    return {"model": shape.tensor_bytes, "kv": kv, "output": output, "compute": compute}


def estimate_gguf(backend: BackendSpec, path: Path) -> VramEstimate:
    shape = read_gguf_shape(path)
    buffers = llamacpp_buffers(
        shape, backend.context_size, backend.parallel, backend.kv_cache_dtype
    )
    gpus = max(backend.gpus_wanted, 1)
    cache = prompt_cache_mib(backend, path) * MIB
    return VramEstimate(
        weights=buffers["model"],
        kv_cache=buffers["kv"],
        compute=buffers["compute"] + buffers["output"],
        overhead=CUDA_OVERHEAD_PER_GPU * gpus if backend.gpus_wanted else 0,
        note=f"GGUF, n_ctx {backend.context_size} over {backend.parallel} slot(s), "
        f"prompt cache {cache // MIB} MiB in RAM",
        prompt_cache=cache,
        cpu=not backend.gpus_wanted,
    )


MIB = 1024 * 1024
# The prompt cache when the model cannot be read to size it (a KV cache of a 7B model at 4096).
PROMPT_CACHE_FALLBACK_MIB = 512


def prompt_cache_mib(backend: BackendSpec, path: str | Path | None) -> int:
    """llama.cpp's --cache-ram for `backend`: its cache_ram_mib, else the size of its KV cache.
    llama.cpp's own default is 8192 MiB: the embedded server grew from 200 MiB to 3.8 GiB over
    40 minutes of varied prompts (docs/reliability.md). One KV cache's worth keeps a full
    context's states for reuse and bounds the server's memory by what the desired state says."""
    if backend.cache_ram_mib is not None:
        return backend.cache_ram_mib
    try:
        shape = read_gguf_shape(Path(path)) if path else None
    except Exception:  # an unreadable model fails at start with its own message
        shape = None
    if shape is None:
        return PROMPT_CACHE_FALLBACK_MIB
    kv = llamacpp_buffers(shape, backend.context_size, backend.parallel, backend.kv_cache_dtype)[
        "kv"
    ]
    return max(1, -(-kv // MIB))


# -- safetensors / vLLM and TGI ----------------------------------------------------------------
def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {len(prefix)} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * MiB:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return header


def _json_object(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def safetensors_weights(path: Path) -> tuple[int, int]:
    """(parameter count, stored bytes) of a safetensors file or a directory of shards.

    With an index, only the shards its weight_map names count: Mistral repositories ship
    consolidated.safetensors beside the HF shards, the same weights twice."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if path.is_dir() and index.exists():
        data = _json_object(index)
        weight_map = data.get("weight_map") or {}
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is not a JSON object")
        # Shard names stay inside the model's directory, whatever the index says.
        names = {Path(str(f)) for f in weight_map.values()}
        shards = sorted(str(n) for n in names if not n.is_absolute() and ".." not in n.parts)
        files = [path / s for s in shards if (path / s).is_file()]
        if len(files) < len(shards) or not files:
            # Shards not (all) downloaded: the index still knows the total size.
            total = int((data.get("metadata") or {}).get("total_size") or 0)
            if total:
                return total // 2, total
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    params = stored = 0
    for file in files:
        for name, tensor in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            shape = tensor.get("shape") if isinstance(tensor, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"{file}: tensor {name!r} has no valid shape")
            count = math.prod(shape)
            params += count
            stored += count * SAFETENSORS_DTYPE_BYTES.get(tensor.get("dtype"), 2)
    return params, stored


def _kv_bytes_per_token(config: dict, kv_bytes: float) -> float:
    # `x.get(...) or default`: configs carry nulls ("num_key_value_heads": null), not only gaps.
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise ValueError("config.json: text_config is not a JSON object")
    layers = int(text.get("num_hidden_layers") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size") or 0) // heads)
    return 2 * layers * kv_heads * head_dim * kv_bytes


def estimate_safetensors(backend: BackendSpec, path: Path) -> VramEstimate:
    params, stored = safetensors_weights(path)
    fp8 = (backend.quantization or "").lower().startswith("fp8")
    weights = params if fp8 else stored  # on-the-fly FP8 holds one byte per parameter
    directory = path if path.is_dir() else path.parent
    kv = 0
    if (directory / "config.json").exists():
        config = _json_object(directory / "config.json")
        kv_dtype = (backend.kv_cache_dtype or "").lower() or None
        kv = int(
            _kv_bytes_per_token(config, KV_DTYPE_BYTES.get(kv_dtype, 2.0)) * backend.context_size
        )
    # The weights split over the tensor-parallel shards, not over every GPU given: with more
    # GPUs than shards the extra ones hold nothing and each shard holds its full part.
    shards = backend.tensor_parallel_size
    note = f"{params / 1e9:.1f}B parameters, {'FP8' if fp8 else 'stored dtype'} weights"
    fraction = 0.0
    kind = kind_of(backend.kind)
    if kind.memory.reserved_fraction:
        # vLLM claims gpu_memory_utilization of each GPU's own total at start, whatever it
        # needs; its shard of the weights and one full sequence must fit inside that share.
        fraction = float(getattr(backend, kind.memory.reserved_fraction))
        note += f", {kind.title} reserves {fraction:.0%} of each GPU"
    return VramEstimate(
        weights=weights,
        kv_cache=kv,
        overhead=ACTIVATION_ALLOWANCE_PER_GPU * shards,
        note=note,
        gpu_fraction=fraction,
        shards=shards,
    )
