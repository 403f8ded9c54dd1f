"""`tensorforge pull` resolves declared models, catalog names and ORG/REPO, and pulls through
the local hub (HF_ENDPOINT); nothing reaches the internet."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.gguf_files import tiny_gguf
from fakes.hub import FakeHub, point_hub_client_at

from reconciler.cli import main
from reconciler.config.schema import ModelSpec
from reconciler.models import catalog
from reconciler.models.catalog import catalog_spec, resolve_model
from reconciler.models.pull import registry_for

REPO_ID = "tf-test/Tiny-GGUF"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    weights = {
        "Tiny-Q4_K_M.gguf": tiny_gguf(tmp_path / "a.gguf", rows=16),
        "Tiny-Q8_0.gguf": tiny_gguf(tmp_path / "b.gguf", rows=8, file_type=7),
    }
    hub = FakeHub(REPO_ID, weights)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TF_MODELS", str(tmp_path / "models"))
    monkeypatch.delenv("TF_REGISTRY_URL", raising=False)
    with hub.serve() as url:
        point_hub_client_at(url, monkeypatch)
        yield hub


def test_pull_org_repo_with_a_pattern(hub, tmp_path, capsys):
    assert main(["pull", REPO_ID, "--pattern", "*Q8_0.gguf"]) == 0
    out = capsys.readouterr().out
    assert f"tiny: {tmp_path}/models/tiny/Tiny-Q8_0.gguf" in out and f"@ {hub.commit[:12]}" in out
    assert registry_for(tmp_path / "models").get("tiny").quantization == "Q8_0"


def test_pull_a_catalog_name_without_a_config(hub, tmp_path, monkeypatch):
    entry = {"source": f"hf:{REPO_ID}", "pattern": "*Q4_K_M.gguf", "aliases": ["tiny-cat"]}
    monkeypatch.setitem(catalog.CATALOG, "tiny-1b", entry)
    assert main(["pull", "tiny-cat"]) == 0
    record = registry_for(tmp_path / "models").get("tiny-1b")
    assert record.primary_path.name == "Tiny-Q4_K_M.gguf" and record.aliases == ["tiny-cat"]


def test_unknown_model_is_explained(hub, capsys):
    assert main(["pull", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "neither declared nor in the catalog" in err and "qwen2.5-coder-32b" in err


def test_catalog_names_resolve_to_repositories():
    name, spec = catalog_spec("qwen2.5-coder-32b")
    assert (name, spec.source, spec.pattern) == (
        "qwen2.5-coder-32b",
        "hf:bartowski/Qwen2.5-Coder-32B-Instruct-GGUF",
        "*Q4_K_M.gguf",
    )
    assert catalog_spec("llama-3.1-8b-instruct")[1].source.startswith("hf:bartowski/Meta-Llama-3.1")
    assert catalog_spec("smollm2-135m")[1].sha256  # the one we can verify offline is pinned


def test_declared_models_win_and_command_line_choices_override():
    declared = {
        "coder": ModelSpec(source="path:/srv/m", file="x.gguf", aliases=["qwen2.5-coder-32b"])
    }
    names = {"coder": "coder", "qwen2.5-coder-32b": "coder"}
    assert resolve_model("qwen2.5-coder-32b", declared, names)[:1] == ("coder",)
    name, spec, origin = resolve_model("qwen2.5-coder-7b", {}, {}, "abc1234", "*Q8_0.gguf")
    assert (origin, spec.revision, spec.pattern, spec.file) == (
        "catalog",
        "abc1234",
        "*Q8_0.gguf",
        None,
    )
    assert resolve_model("org/Some-Model-GGUF", {}, {})[:1] == ("some-model",)


def test_a_bad_flag_is_named_not_dumped(capsys):
    """A value given on the command line fails with the flag's name and the rule, not a
    pydantic dump; nothing is fetched."""
    assert main(["pull", "tf-test/Tiny-GGUF", "--file", "../../etc/passwd"]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == "error: --file: file must be a relative name inside the source, without '..'"
    )
    with pytest.raises(ValueError, match=r"^--file: file must be a relative name"):
        resolve_model("smollm2", {}, {}, file="/etc/passwd")
