"""Where the llama.cpp backend's `llama-server` is found, and `up --no-gateway`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from reconciler.backends import commands
from reconciler.backends.commands import find_llama_server, launch_for
from reconciler.config.schema import BackendSpec


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def empty_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("TF_LLAMACPP_BIN_DIR", raising=False)


def test_found_next_to_the_interpreter_when_not_on_path(empty_path, monkeypatch, tmp_path):
    """`tensorforge bootstrap` installs into the venv's bin/, which need not be on PATH."""
    venv_bin = tmp_path / "venv" / "bin"
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert find_llama_server() is None
    server = executable(venv_bin / "llama-server")
    assert find_llama_server() == str(server)
    backend = BackendSpec(kind="llamacpp", model="m", port=8080)
    argv = launch_for("b", backend, "m", "/m.gguf", []).argv
    assert argv[0] == str(server) and "--metrics" in argv


def test_path_wins_over_the_venv(empty_path, monkeypatch, tmp_path):
    on_path = executable(tmp_path / "path" / "llama-server")
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    executable(tmp_path / "venv" / "bin" / "llama-server")
    assert find_llama_server() == str(on_path)


def test_bootstrap_bin_dir_and_non_executables(empty_path, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    not_executable = tmp_path / "venv" / "bin" / "llama-server"
    not_executable.parent.mkdir(parents=True)
    not_executable.write_text("")
    assert find_llama_server() is None
    elsewhere = executable(tmp_path / "built" / "llama-server")
    monkeypatch.setenv("TF_LLAMACPP_BIN_DIR", str(elsewhere.parent))
    assert find_llama_server() == str(elsewhere)


def test_without_a_binary_the_in_process_server_runs(empty_path, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    backend = BackendSpec(kind="llamacpp", model="m", port=8080)
    argv = launch_for("b", backend, "m", "/m.gguf", []).argv
    assert argv[:3] == [sys.executable, "-m", "reconciler.backends.llamacpp_server"]
    assert commands.find_llama_server() is None and os.environ["PATH"].endswith("nothing-here")


def test_llamacpp_reuses_a_conversations_cache_and_the_wrapper_takes_the_flag(empty_path, tmp_path):
    """Prefix reuse across turns: --cache-reuse on every llama.cpp launch, the binary's and the
    in-process server's, which sets xllamacpp's n_cache_reuse from it."""
    from reconciler.backends.llamacpp_server import parse_args

    backend = BackendSpec(kind="llamacpp", model="m", port=8080)
    for binary in (None, str(tmp_path / "llama-server")):
        argv = launch_for(
            "b", backend.model_copy(update={"binary": binary}), "m", "/m.gguf", []
        ).argv
        assert int(argv[argv.index("--cache-reuse") + 1]) == commands.CACHE_REUSE_TOKENS > 0
    assert parse_args(["--model", "x.gguf", "--cache-reuse", "256"]).cache_reuse == 256


# -- `tensorforge up --no-gateway` ------------------------------------------------------------------
HOST = """
models:
  m: {source: "path:/models/m.gguf"}
backends:
  b: {kind: llamacpp, model: m, port: 18080}
  far: {kind: vllm, model: m, url: "http://far:8001"}
gateway: {port: 18000}
"""


def test_no_gateway_reconciles_backends_only(tmp_path):
    from reconciler.cli import build_parser
    from reconciler.controller import GATEWAY_UNIT, Controller
    from reconciler.drivers.process import ProcessDriver
    from reconciler.gpu.inventory import StaticInventory

    config = tmp_path / "host.yaml"
    config.write_text(HOST)
    args = build_parser().parse_args(["up", "--no-gateway", "--config", str(config)])
    assert args.no_gateway is True
    assert build_parser().parse_args(["up"]).no_gateway is False

    def units(run_gateway: bool) -> set[str]:
        controller = Controller(
            str(config), driver=ProcessDriver(tmp_path / "state"), gpus=StaticInventory([]),
            state=tmp_path / "state", run_gateway=run_gateway,
        )  # fmt: skip
        return set(controller.desired_units())

    assert units(True) == {"backend-b", GATEWAY_UNIT}
    assert units(False) == {"backend-b"}
