"""What a GGUF file says about itself: architecture, shape and tensor bytes, read with the
`gguf` package (llama.cpp's own reader) without loading the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# general.file_type values (llama_ftype) for the names people know.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    block_count: int
    context_length: int | None
    embedding_length: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    tensor_bytes: int
    parameter_count: int
    file_type: str | None

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: int = 2) -> int:
        """llama.cpp's KV cache: n_ctx * n_layer * n_head_kv * (k_dim + v_dim) elements."""
        per_token = self.block_count * self.head_count_kv * (self.key_length + self.value_length)
        return n_ctx * per_token * bytes_per_element


def read_gguf_info(path: Path) -> GGUFInfo:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str, default=None):
        found = reader.fields.get(key)
        return found.contents() if found is not None else default

    arch = field("general.architecture", "unknown")
    heads = int(field(f"{arch}.attention.head_count", 1))
    heads_kv = int(field(f"{arch}.attention.head_count_kv", heads))
    embd = int(field(f"{arch}.embedding_length", 0))
    head_dim = embd // heads if heads else 0
    file_type = field("general.file_type")
    ctx = field(f"{arch}.context_length")
    return GGUFInfo(
        architecture=arch,
        block_count=int(field(f"{arch}.block_count", 0)),
        context_length=int(ctx) if ctx is not None else None,
        embedding_length=embd,
        head_count=heads,
        head_count_kv=heads_kv,
        key_length=int(field(f"{arch}.attention.key_length", head_dim)),
        value_length=int(field(f"{arch}.attention.value_length", head_dim)),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        file_type=FILE_TYPES.get(int(file_type)) if file_type is not None else None,
    )
