"""Small valid GGUF files for tests that read model metadata (sizes, VRAM estimates)."""

from __future__ import annotations

from pathlib import Path


def tiny_gguf(path: Path, rows: int = 128, file_type: int = 15) -> bytes:
    """A small but valid llama-architecture GGUF (one f32 tensor of rows x 256), as bytes."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(2048)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_file_type(file_type)
    writer.add_tensor(
        "token_embd.weight", np.arange(rows * 256, dtype=np.float32).reshape(rows, 256)
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
