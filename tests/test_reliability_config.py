"""Issue 14, the desired state's side: settings that passed `validate` and broke at run time
(a 1e-9 or infinite health interval, port clashes spelled LOCALHOST or 127.1, a missing keys
file), files too big or too deep to parse safely, and the reference host file that must
name every setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from reconciler.config.loader import MAX_FILE_BYTES, ConfigError, load_desired_state
from reconciler.config.schema import BackendSpec, DesiredState, ModelSpec

REPO = Path(__file__).resolve().parent.parent
MODELS = {"m": {"source": "pypi:x"}}


def load(tmp_path: Path, config: dict, name: str = "host.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_desired_state(path)
    return caught.value.problems


@pytest.mark.parametrize("value", [1e-9, 0.05, ".inf", ".nan", "-.inf"])
def test_health_interval_must_be_at_least_a_tenth_and_finite(tmp_path, value):
    path = tmp_path / "host.yaml"
    path.write_text(f"gateway:\n  health_interval: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_desired_state(path)
    assert caught.value.problems[0].startswith("gateway.health_interval: must be"), (
        caught.value.problems
    )
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("field", ["connect_timeout", "first_byte_timeout", "idle_timeout"])
def test_other_durations_are_bounded_too(tmp_path, field):
    problems = load(tmp_path, {"gateway": {field: float("inf")}})
    assert problems[0].startswith(f"gateway.{field}: must be at most"), problems
    problems = load(tmp_path, {"backends": {"b": {"kind": "llamacpp", "model": "m", "port": 9000,
                                                  "request_timeout": 0}}, "models": MODELS})  # fmt: skip
    assert problems[0].startswith("backends.b.request_timeout: must be at least 0.1"), problems


@pytest.mark.parametrize(
    "spelling", ["LOCALHOST", "127.1", "localhost.", "0x7f.0.0.1", "::ffff:127.0.0.1"]
)
def test_port_clashes_are_found_whatever_the_host_spelling(tmp_path, spelling):
    problems = load(tmp_path, {
        "models": MODELS,
        "backends": {"b": {"kind": "llamacpp", "model": "m", "host": spelling, "port": 8000}},
        "gateway": {"host": "127.0.0.1", "port": 8000},
    })  # fmt: skip
    assert problems == [
        "backends.b.port: 8000 is already used by gateway.port; give each service its own port"
    ]


def test_validate_reports_a_missing_keys_file(tmp_path):
    path = tmp_path / "host.yaml"
    missing = tmp_path / "nope" / "api-keys"
    path.write_text(yaml.safe_dump({"gateway": {"api_keys_file": str(missing)}}))
    cli = [sys.executable, "-m", "reconciler.cli", "validate", "--config", str(path)]
    result = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert (
        f"{path}: gateway.api_keys_file: {missing} does not exist; create it or fix the path"
        in result.stderr
    )
    # At build time (the Nix sandbox has no secrets) the check is skipped on purpose.
    result = subprocess.run([*cli, "--no-file-checks"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    missing.parent.mkdir()
    missing.write_text("sk-" + "k" * 30 + "\n")
    result = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_a_config_over_one_mib_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "huge.yaml"
    path.write_text("models: {}\n" + "#" * MAX_FILE_BYTES)
    parsed = []
    monkeypatch.setattr("reconciler.config.loader.parse_text", lambda *a: parsed.append(a))
    with pytest.raises(
        ConfigError, match=r"huge\.yaml: larger than 1024 KiB; refused before parsing"
    ):
        load_desired_state(path)
    assert parsed == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("flow.yaml", "models: " + "[" * 3000 + "]" * 3000),
        ("block.yaml", "models:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 80))),
        ("deep.json", '{"models": ' + "[" * 3000 + "]" * 3000 + "}"),
    ],
)
def test_deep_nesting_is_a_clear_error_not_a_recursion_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_desired_state(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and "nested deeper than 32 levels" in message, message


def test_the_reference_host_file_names_every_setting():
    """hosts/cpu-dev.yaml says it holds every key the schema knows: hold it to that."""
    document = yaml.safe_load((REPO / "hosts" / "cpu-dev.yaml").read_text())
    missing: list[str] = []

    def walk(model: type[BaseModel], data: dict, path: str) -> None:
        for name, field in model.model_fields.items():
            if name not in data:
                missing.append(path + name)
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, data[name], f"{path}{name}.")

    walk(DesiredState, document, "")
    for name, model in document["models"].items():
        walk(ModelSpec, model, f"models.{name}.")
    for name, backend in document["backends"].items():
        walk(BackendSpec, backend, f"backends.{name}.")
    assert missing == []
    load_desired_state(REPO / "hosts" / "cpu-dev.yaml")
