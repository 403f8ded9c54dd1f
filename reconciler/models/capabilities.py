"""What a model can do, in Ollama's vocabulary (completion, tools, insert, vision, embedding,
thinking), derived from its GGUF metadata the way Ollama derives it from its model files,
unless the desired state declares the list. Pure: no file, process or network here (read
the metadata with `reconciler.models.gguf_metadata.read_gguf_metadata`)."""

from __future__ import annotations

from reconciler.backends.registry import KINDS

CAPABILITIES = ("completion", "tools", "insert", "vision", "embedding", "thinking")

# Encoder-only architectures: they embed, they do not generate.
ENCODERS = frozenset(
    ("bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert")
)
# Fill-in-the-middle token spellings (StarCoder/SmolLM, Qwen, CodeLlama, DeepSeek-Coder), as
# llama.cpp looks for them when the GGUF has no explicit fim_*_token_id keys.
FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)
FIM_KEYS = (
    "tokenizer.ggml.fim_pre_token_id",
    "tokenizer.ggml.fim_suf_token_id",
    "tokenizer.ggml.fim_mid_token_id",
)
THINKING_MARKERS = ("<think>", "enable_thinking", "reasoning_content", "<|channel|>analysis")
# Kinds whose server answers a fill-in-the-middle request (llama.cpp's /infill, Ollama's suffix).
FIM_KINDS = frozenset(k.name for k in KINDS.values() if k.gateway.fill_in_middle)


def model_capabilities(
    gguf_metadata: dict | None, declared: list[str] | None, kind: str
) -> list[str]:
    """The model's capabilities in CAPABILITIES order. `declared` (the desired state's list)
    wins; without metadata (safetensors on vLLM/TGI, a model Ollama holds) only completion is
    assumed. `kind` is the backend kind: only llama.cpp and Ollama serve fill-in-the-middle."""
    if declared is not None:
        unknown = sorted(set(declared) - set(CAPABILITIES))
        if unknown:
            raise ValueError(
                f"unknown capabilities {unknown}; choose from {', '.join(CAPABILITIES)}"
            )
        return [c for c in CAPABILITIES if c in declared]
    if not gguf_metadata:
        return ["completion"]
    meta = gguf_metadata
    arch = str(meta.get("general.architecture", ""))
    template = str(meta.get("tokenizer.chat_template") or "")
    found: set[str] = set()
    # Ollama's rule: a pooling type means an embedding model, otherwise a generating one.
    if f"{arch}.pooling_type" in meta or arch in ENCODERS:
        found.add("embedding")
    else:
        found.add("completion")
        if "tools" in template:
            found.add("tools")
        if any(marker in template for marker in THINKING_MARKERS):
            found.add("thinking")
        if kind in FIM_KINDS and _has_fim(meta):
            found.add("insert")
    if _has_vision(meta, arch):
        found.add("vision")
    return [c for c in CAPABILITIES if c in found]


def _has_fim(meta: dict) -> bool:
    if all(key in meta for key in FIM_KEYS):
        return True
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list | tuple):
        return False
    vocab = set(tokens)
    return any(all(t in vocab for t in triple) for triple in FIM_TOKENS)


def _has_vision(meta: dict, arch: str) -> bool:
    """A vision projector: llama.cpp's mmproj file (`clip.*` keys) merged into the metadata,
    or a model with its vision tower inside (Ollama's newer engine: `<arch>.vision.*`)."""
    if meta.get("clip.has_vision_encoder") is True:
        return True
    return any(key.startswith((f"{arch}.vision.", "clip.vision.")) for key in meta)
