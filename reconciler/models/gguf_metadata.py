"""A GGUF file's key/value metadata as a plain dict (what Ollama shows as `model_info`, and
what `capabilities.model_capabilities` reads), cached per file version."""

from __future__ import annotations

import functools
from pathlib import Path

# Arrays shown in full; longer ones (token lists, merges) are kept for capability checks but
# left out of what `shown` returns, as Ollama leaves them out unless asked to be verbose.
SHORT_ARRAY = 64


def read_gguf_metadata(path: str | Path) -> dict:
    """Every metadata key of the GGUF at `path` (header checked first: a hostile count fails
    fast with ValueError). Cached while the file's size and mtime stay the same."""
    return read_gguf_file(path)[0]


def read_gguf_file(path: str | Path) -> tuple[dict, int, int]:
    """(metadata, tensor bytes, parameter count) from one parse of the file: parsing a
    vocabulary of 50k-150k tokens costs seconds on a busy machine, so it is done once."""
    stat = Path(path).stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read(path: str, size: int, mtime_ns: int) -> tuple[dict, int, int]:
    from gguf import GGUFReader

    from reconciler.models.gguf_info import check_gguf

    check_gguf(path)
    reader = GGUFReader(path)
    out: dict = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        out[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    return out, tensor_bytes, sum(int(t.n_elements) for t in reader.tensors)


def shown(metadata: dict) -> dict:
    """The metadata fit to show: long arrays (tokens, merges) become empty lists."""
    return {
        k: [] if isinstance(v, list) and len(v) > SHORT_ARRAY else v for k, v in metadata.items()
    }
