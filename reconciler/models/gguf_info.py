"""What a GGUF file says about itself: architecture, shape and tensor bytes, read from its
header by a bounded walk of our own, without loading the weights (the `gguf` package's
reader, which gguf_metadata.py uses for the full key list, takes seconds per vocabulary).

GGUFReader trusts every count and length in the header: an array declaring 2**62 items makes
it loop and allocate without bound. `check_gguf` walks the header first, each count checked
against the bytes left in the file, so a hostile or corrupt file fails fast with one clear
ValueError instead of hanging the reconciler."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
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
    head_count: int  # per-layer head counts (Jamba, LFM2, OpenELM): the largest, for display
    head_count_kv: int
    key_length: int
    value_length: int
    tensor_bytes: int
    parameter_count: int
    file_type: str | None
    kv_elements_per_token: int = 0  # sum over layers of head_count_kv * (key_length + value_length)

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: int = 2) -> int:
        """llama.cpp's KV cache: n_ctx * sum over layers of n_head_kv * (k_dim + v_dim) elements."""
        return n_ctx * self.kv_elements_per_token * bytes_per_element


def read_gguf_info(path: Path) -> GGUFInfo:
    header = scan_gguf(path)

    def field(key: str, default=None):
        return header.values.get(key, default)

    arch = field("general.architecture", "unknown")
    embd = int(field(f"{arch}.embedding_length", 0))
    layers = int(field(f"{arch}.block_count", 0))
    attention = read_attention(field, arch, layers, embd)
    file_type = field("general.file_type")
    ctx = field(f"{arch}.context_length")
    return GGUFInfo(
        architecture=arch,
        block_count=layers,
        context_length=int(ctx) if ctx is not None else None,
        embedding_length=embd,
        head_count=attention.head_count,
        head_count_kv=attention.head_count_kv,
        key_length=attention.key_length,
        value_length=attention.value_length,
        tensor_bytes=header.tensor_bytes,
        parameter_count=header.parameter_count,
        file_type=FILE_TYPES.get(int(file_type)) if file_type is not None else None,
        kv_elements_per_token=attention.kv_elements_per_token,
    )


# -- attention shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Attention:
    head_count: int  # the largest over the layers
    head_count_kv: int
    key_length: int
    value_length: int
    kv_elements_per_token: int  # sum over layers of head_count_kv * (key_length + value_length)


def read_attention(field: Callable, arch: str, n_layer: int, n_embd: int) -> Attention:
    """The attention shape, scalar or per layer. Hybrid and variable-width models (Jamba, LFM2,
    OpenELM, Nemotron-51B) store head_count / head_count_kv as one value per layer; a layer with
    0 KV heads (a Mamba or convolution layer) has no KV cache."""
    raw_heads = field(f"{arch}.attention.head_count", 1)
    raw_kv = field(f"{arch}.attention.head_count_kv")
    raw_k = field(f"{arch}.attention.key_length")
    raw_v = field(f"{arch}.attention.value_length")
    heads = _per_layer(raw_heads, n_layer, "attention.head_count")
    heads_kv = heads if raw_kv is None else _per_layer(raw_kv, n_layer, "attention.head_count_kv")
    head_dims = [n_embd // h if h else 0 for h in heads]  # each layer's own width per head
    keys = head_dims if raw_k is None else _per_layer(raw_k, n_layer, "attention.key_length")
    values = head_dims if raw_v is None else _per_layer(raw_v, n_layer, "attention.value_length")
    top = _largest(raw_heads)
    width = max(head_dims, default=n_embd // top if top else 0)
    return Attention(
        head_count=top,
        head_count_kv=_largest(raw_kv) if raw_kv is not None else top,
        key_length=_largest(raw_k) if raw_k is not None else width,
        value_length=_largest(raw_v) if raw_v is not None else width,
        kv_elements_per_token=sum(
            kv * (k + v) for kv, k, v in zip(heads_kv, keys, values, strict=True)
        ),
    )


def _per_layer(value, n_layer: int, what: str) -> list[int]:
    """One int per layer: a scalar applies to every layer, an array must have one per layer."""
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ValueError(f"{what} has {len(value)} per-layer values for block_count {n_layer}")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def _largest(value) -> int:
    return max((int(v) for v in value), default=0) if isinstance(value, list) else int(value)


# -- bounded header check ----------------------------------------------------------------------
# GGUF value types: struct formats of the numbers (8 is a string, 9 an array).
_SCALAR_FORMATS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_SCALAR_SIZES = {kind: struct.calcsize(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
# Arrays of numbers up to this length are kept (per-layer shapes); of longer ones, the length.
_SHORT_ARRAY = 4096
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MAX_NESTING = 4  # arrays of arrays; llama.cpp writes none deeper than 2
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SUPPORTED_VERSIONS = (2, 3)  # what gguf's reader handles


class _Unusable(Exception):
    pass


@dataclass(frozen=True)
class GGUFHeader:
    """What the bounded walk reads: scalar and string metadata, arrays of numbers up to
    _SHORT_ARRAY items as lists, every array's length, and the tensor table's sizes."""

    values: dict[str, object]
    array_lengths: dict[str, int]
    tensor_bytes: int
    parameter_count: int


def check_gguf(path: str | Path) -> None:
    """Walk the GGUF header (metadata and tensor table) with every count and length bounded by
    the bytes left in the file, and every tensor's data inside it. Raises
    ValueError("<path>: not a usable GGUF: ...") on the first thing that cannot be."""
    scan_gguf(path)


def scan_gguf(path: str | Path) -> GGUFHeader:
    """check_gguf's walk, keeping what it read. A fraction of GGUFReader's cost: it never builds
    a numpy view per vocabulary string (seconds for SmolLM2's 49k tokens, on every CLI start)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise _Unusable(f"{size} bytes, shorter than a GGUF header (24)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                scan = _HeaderScan(data, size)
                scan.run()
    except _Unusable as exc:
        raise ValueError(f"{path}: not a usable GGUF: {exc}") from None
    return GGUFHeader(scan.values, scan.array_lengths, scan.tensor_bytes, scan.parameters)


class _HeaderScan:
    def __init__(self, data: mmap.mmap, size: int):
        self.data, self.size, self.offs, self.order = data, size, 0, "<"
        self.values: dict[str, object] = {}
        self.array_lengths: dict[str, int] = {}
        self.tensor_bytes = self.parameters = 0

    def left(self) -> int:
        return self.size - self.offs

    def take(self, fmt: str, what: str) -> tuple[int, ...]:
        fmt = self.order + fmt
        n = struct.calcsize(fmt)
        if n > self.left():
            raise _Unusable(f"{what}: truncated at byte {self.offs} of {self.size}")
        values = struct.unpack_from(fmt, self.data, self.offs)
        self.offs += n
        return values

    def number(self, fmt: str, what: str) -> int:
        return self.take(fmt, what)[0]

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Unusable(f"{what}: {n} bytes declared, {self.left()} left in the file")
        self.offs += n

    def string(self, what: str) -> bytes:
        length = self.number("Q", f"{what} length")
        start = self.offs
        self.skip(length, what)
        return self.data[start : self.offs]

    def fits(self, count: int, each: int, what: str) -> None:
        if count * each > self.left():
            raise _Unusable(
                f"{what}: {count} declared, the {self.left()} bytes left hold at most "
                f"{self.left() // each}"
            )

    def run(self) -> None:
        if self.data[:4] != b"GGUF":
            raise _Unusable(f"no GGUF magic (starts with {bytes(self.data[:4])!r})")
        self.offs = 4
        version = self.number("I", "version")
        if version & 0xFFFF == 0:  # written big-endian (gguf's reader detects it the same way)
            self.order = ">"
            version = struct.unpack_from(">I", self.data, 4)[0]
        if version not in _SUPPORTED_VERSIONS:
            raise _Unusable(f"GGUF version {version}; only versions 2 and 3 can be read")
        tensors, kvs = self.take("QQ", "tensor and metadata counts")
        self.fits(kvs, _MIN_KV, "metadata pairs")
        self.fits(tensors, _MIN_TENSOR_INFO, "tensors")
        alignment = 32  # GGUF_DEFAULT_ALIGNMENT
        for n in range(kvs):
            key = self.string(f"metadata key {n}")
            name = key.decode("utf-8", "replace")
            kind = self.number("I", f"{name}: type")
            if key == b"general.alignment":
                if kind != _UINT32:
                    raise _Unusable(f"general.alignment has type {kind}, not uint32")
                alignment = self.number("I", name)
                if alignment == 0 or alignment & (alignment - 1):
                    raise _Unusable(f"general.alignment {alignment} is not a power of two")
                self.values[name] = alignment
                continue
            value = self.value(kind, name, 0)
            if value is not None:
                self.values[name] = value
        table = [self.tensor_info(n) for n in range(tensors)]
        data_start = -(-self.offs // alignment) * alignment
        self.tensor_data(table, data_start)

    def value(self, kind: int, what: str, depth: int) -> object:
        """The value read (None for arrays of strings or arrays, and long arrays of numbers:
        walked and bounded, their length kept for a top-level key)."""
        if kind in _SCALAR_SIZES:
            return self.number(_SCALAR_FORMATS[kind], what)
        if kind == _STRING:
            return self.string(what).decode("utf-8", "replace")
        if kind != _ARRAY:
            raise _Unusable(f"{what}: unknown value type {kind}")
        if depth >= _MAX_NESTING:
            raise _Unusable(f"{what}: arrays nested deeper than {_MAX_NESTING}")
        item, count = self.take("IQ", f"{what}: array header")
        if depth == 0:
            self.array_lengths[what] = count
        if item in _SCALAR_SIZES:
            if count <= _SHORT_ARRAY:
                fmt = f"{count}{_SCALAR_FORMATS[item]}"
                return list(self.take(fmt, f"{what}: array of {count}"))
            self.skip(count * _SCALAR_SIZES[item], f"{what}: array of {count}")
        elif item == _STRING:
            self.fits(count, 8, f"{what}: array of strings")
            self.strings(count, what)
        elif item == _ARRAY:
            self.fits(count, 12, f"{what}: array of arrays")
            for _ in range(count):
                self.value(_ARRAY, what, depth + 1)
        else:
            raise _Unusable(f"{what}: unknown array item type {item}")
        return None

    def strings(self, count: int, what: str) -> None:
        # A vocabulary is ~150k strings: a tight loop, not a call per string.
        unpack = struct.Struct(self.order + "Q").unpack_from
        data, size, offs = self.data, self.size, self.offs
        for index in range(count):
            if offs + 8 > size:
                raise _Unusable(f"{what}[{index}]: truncated at byte {offs} of {size}")
            offs += 8 + unpack(data, offs)[0]
            if offs > size:
                raise _Unusable(f"{what}[{index}]: string runs past the end of the file")
        self.offs = offs

    def tensor_info(self, n: int) -> tuple[str, list[int], int, int]:
        name = self.string(f"tensor {n} name").decode("utf-8", "replace")
        n_dims = self.number("I", f"tensor {name}: n_dims")
        if n_dims > _MAX_DIMS:
            raise _Unusable(f"tensor {name}: {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = list(self.take(f"{n_dims}Q", f"tensor {name}: dims"))
        ggml_type, offset = self.take("IQ", f"tensor {name}: type and offset")
        return name, dims, ggml_type, offset

    def tensor_data(self, table: list[tuple[str, list[int], int, int]], data_start: int) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        for name, dims, ggml_type, offset in table:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise _Unusable(f"tensor {name}: unknown ggml type {ggml_type}") from None
            elements = 1
            for d in dims:
                elements *= d
            n_bytes = elements * type_size // block
            end = data_start + offset + n_bytes
            if end > self.size:
                raise _Unusable(
                    f"tensor {name}: its data ends at byte {end}, the file has {self.size}"
                )
            self.tensor_bytes += n_bytes
            self.parameters += elements
