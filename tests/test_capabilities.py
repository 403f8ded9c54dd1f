"""Capability derivation from GGUF metadata, as Ollama derives them from its model files:
synthetic metadata for each rule, and the real SmolLM2 file (a plain chat model)."""

from __future__ import annotations

import pytest

from reconciler.models.capabilities import model_capabilities
from reconciler.models.gguf_metadata import read_gguf_metadata, shown

QWEN_TEMPLATE = "{%- if tools %}<tools>{{ tool | tojson }}</tools>{%- endif %}<think>\n\n</think>"


def test_a_plain_chat_model_only_completes():
    meta = {"general.architecture": "llama", "tokenizer.chat_template": "{{ message['content'] }}"}
    assert model_capabilities(meta, None, "llamacpp") == ["completion"]


def test_template_with_tools_and_think_tags():
    meta = {"general.architecture": "qwen3", "tokenizer.chat_template": QWEN_TEMPLATE}
    assert model_capabilities(meta, None, "llamacpp") == ["completion", "tools", "thinking"]


def test_pooling_type_means_embedding_not_completion():
    assert model_capabilities(
        {"general.architecture": "qwen3", "qwen3.pooling_type": 3}, None, "llamacpp"
    ) == ["embedding"]
    assert model_capabilities({"general.architecture": "nomic-bert"}, None, "llamacpp") == [
        "embedding"
    ]


def test_fim_tokens_mean_insert_where_the_backend_serves_it():
    by_keys = {"general.architecture": "qwen2", "tokenizer.ggml.fim_pre_token_id": 1,
               "tokenizer.ggml.fim_suf_token_id": 2, "tokenizer.ggml.fim_mid_token_id": 3}  # fmt: skip
    by_text = {
        "general.architecture": "starcoder2",
        "tokenizer.ggml.tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    }
    assert "insert" in model_capabilities(by_keys, None, "llamacpp")
    assert "insert" in model_capabilities(by_text, None, "ollama")
    assert "insert" not in model_capabilities(by_text, None, "vllm")  # vLLM refuses `suffix`
    assert "insert" not in model_capabilities(
        {**by_text, "tokenizer.ggml.tokens": ["<fim_prefix>"]}, None, "llamacpp"
    )


def test_vision_projector():
    assert "vision" in model_capabilities(
        {"general.architecture": "llama", "clip.has_vision_encoder": True}, None, "llamacpp"
    )
    assert "vision" in model_capabilities(
        {"general.architecture": "gemma3", "gemma3.vision.block_count": 27}, None, "ollama"
    )


def test_declared_list_wins_and_is_checked():
    meta = {"general.architecture": "llama", "tokenizer.chat_template": QWEN_TEMPLATE}
    assert model_capabilities(meta, ["tools", "completion"], "llamacpp") == ["completion", "tools"]
    with pytest.raises(ValueError, match="unknown capabilities \\['fly'\\]"):
        model_capabilities(None, ["fly"], "vllm")


def test_without_metadata_completion_is_assumed():
    assert model_capabilities(None, None, "vllm") == ["completion"]


def test_smollm2_file(smollm2_path):
    meta = read_gguf_metadata(smollm2_path)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 8192
    assert model_capabilities(meta, None, "llamacpp") == [
        "completion"
    ]  # no tools in its template, no FIM tokens
    assert (
        shown(meta)["tokenizer.ggml.tokens"] == [] and shown(meta)["general.basename"] == "smollm2"
    )
