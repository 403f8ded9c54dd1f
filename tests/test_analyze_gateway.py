"""Issue 20, fixes 3 and 5, against the real gateway (`tensorforge gateway`, API keys on) in
front of a fast stand-in backend (tests.fakes.upstreams.FastOpenAI, which answers every
chat request with one whole sentence): the model's prose is not what is tested here, the
plumbing is (the key is sent, a refusal is an error, outputs are checked first, summaries are
marked as the model's, tests are not summarized by default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, smollm2_config
from fakes.upstreams import FastOpenAI, serve

FIXTURE = REPO / "tests" / "fixtures" / "analyze" / "python"


@pytest.fixture
def keyed_gateway(run_gateway, tmp_path: Path):
    """(desired-state file, key): a gateway with API keys on, as the desired state declares it."""
    keys = tmp_path / "api-keys"
    keys.write_text("sk-analyze analyzer\n")
    port = free_port()
    with serve(FastOpenAI(), port):
        config = smollm2_config(f"http://127.0.0.1:{port}", free_port(), api_keys_file=str(keys))
        config["models"]["smollm2"]["file"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
        run_gateway(config)
        path = tmp_path / "desired.yaml"
        path.write_text(yaml.safe_dump(config))
        yield path, "sk-analyze"


def analyze(config: Path, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_API_KEY"}
    if key is not None:
        env["TF_API_KEY"] = key
    command = [sys.executable, "-m", "reconciler.cli", "analyze", str(FIXTURE), "-q"]
    return subprocess.run(
        [*command, "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip


def test_a_keyed_gateway_without_the_key_is_an_error_and_nothing_is_written(
    keyed_gateway, tmp_path: Path
):
    config, _ = keyed_gateway
    out = tmp_path / "r.md"
    for key in (None, "sk-wrong"):
        done = analyze(config, "--output", str(out), key=key)
        assert done.returncode == 1, done.stderr
        assert "401" in done.stderr and "--api-key" in done.stderr and "TF_API_KEY" in done.stderr
        assert not out.exists()


def test_the_key_from_the_environment_or_the_option_gives_marked_summaries(
    keyed_gateway, tmp_path: Path
):
    config, key = keyed_gateway
    out, data = tmp_path / "r.md", tmp_path / "r.json"
    # The gateway comes from the desired state (no --gateway), the key from TF_API_KEY.
    done = analyze(config, "--output", str(out), "--json", str(data), key=key)
    assert done.returncode == 0, done.stderr
    report = json.loads(data.read_text())
    summaries = {m["path"]: m["summary"] for m in report["modules"]}
    assert summaries["app/core.py"]["status"] == "summarized"
    assert summaries["app/core.py"]["text"] == "Hello there, friend."
    assert summaries["app/core.py"]["model"] == "smollm2"  # who wrote it travels with it
    test_summary = summaries["tests/check_core.py"]  # a test: not summarized by default
    assert test_summary["status"] == "skipped" and "--summarize test" in test_summary["reason"]
    caution = report["summaries"]["caution"]
    assert "smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf, about 135M parameters)" in caution
    markdown = out.read_text()
    overview = markdown.split("## Architecture overview (written by a model)")[1]
    assert overview.lstrip().startswith("> **Caution:** The overview and the module summaries")
    # The facts come first; the model's words after them, each marked.
    assert markdown.index("## Dependency graph") < markdown.index("## Architecture overview")
    assert "_Summary by `smollm2` (model-written):_ Hello there, friend." in markdown

    # The key from --api-key; tests summarized when asked for.
    done = analyze(config, "--output", str(out), "--json", str(data), "--api-key", key,
                   "--summarize", "all")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(data.read_text())
    summary = next(m["summary"] for m in report["modules"] if m["path"] == "tests/check_core.py")
    assert summary["status"] == "summarized"


def test_outputs_are_checked_before_the_gateway_is_asked(tmp_path: Path):
    """The gateway here is unreachable: the output check must fail first (exit 2, naming the
    option), or it would have been found only after every summary was made."""
    config = tmp_path / "desired.yaml"
    config.write_text(yaml.safe_dump(smollm2_config("http://127.0.0.1:9", free_port())))
    for option, path, problem in (
        ("--output", tmp_path / "missing" / "r.md", "does not exist"),
        ("--json", tmp_path, "is a directory"),
    ):
        done = analyze(config, option, str(path))
        assert done.returncode == 2, done.stderr
        assert f"{option} {path}: " in done.stderr and problem in done.stderr
        assert "unreachable" not in done.stderr
    done = analyze(config, "--output", str(tmp_path / "r.md"), "--summarize", "tests")
    assert done.returncode == 2 and "--summarize 'tests': unknown kind(s) tests" in done.stderr
