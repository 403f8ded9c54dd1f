"""What a model served by a backend kind can do, from what the operator declared, else from
the kind's server and the model file's own metadata (GGUF key/values). Pure: no file or
network access here; callers read the metadata."""

from __future__ import annotations

# What each kind's server offers for any model it loads (the model may add more, below).
KIND_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "llamacpp": ("completion", "json_schema", "tokenize", "messages", "responses"),
    "vllm": ("completion", "tools", "json_schema", "tokenize", "messages", "responses"),
    "tgi": ("completion", "tools", "json_schema"),
    "ollama": ("completion", "tools", "json_schema", "embedding"),  # /api/embed works with any model
    "openai": ("completion", "tools", "json_schema", "responses", "embedding"),
}
POOLING_RANK = 4  # llama_pooling_type LLAMA_POOLING_TYPE_RANK: a reranker


def model_capabilities(gguf_metadata: dict | None, declared: list[str] | None, kind: str) -> list[str]:
    """Sorted capability names. `declared` (the desired state's list) wins outright; otherwise
    the kind's own, plus what the GGUF metadata shows: a chat template that takes `tools` or
    emits thinking, fill-in-the-middle tokens, a vision encoder, a pooling type."""
    if declared is not None:
        return sorted(set(declared))
    found = set(KIND_CAPABILITIES.get(kind, ("completion",)))
    meta = gguf_metadata or {}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        if "tools" in template:
            found.add("tools")
        if "<think>" in template or "enable_thinking" in template or "reasoning_content" in template:
            found.add("thinking")
    if kind == "llamacpp" and meta.get("tokenizer.ggml.fim_pre_token_id") is not None:
        found.add("insert")
    if meta.get("clip.has_vision_encoder"):
        found.add("vision")
    pooling = next((v for k, v in meta.items() if k.endswith(".pooling_type")), None)
    if pooling == POOLING_RANK:
        found.add("rerank")
    elif pooling:
        found.add("embedding")
    return sorted(found)
