"""services.tensorforge.settings (RFC 42): the desired state as one freeform JSON option.

Under nixpkgs' real `lib.evalModules` (tests/nix/eval-module.nix, NIXPKGS_LIB): each host's
desired.json equals its commented YAML example apart from what NixOS adds; settings reach the
file as written and unset ones are left to the schema; a bad setting is refused by the build
step's `tensorforge validate` naming the field; keys NixOS owns are refused in settings; the
b200Optimized tuning reaches every local backend as defaults; and configurations written for
the old camelCase options keep working, each old option used warning once with its new name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reconciler.config.loader import validate_data
from tests.test_nix_module_eval import (
    HOSTS,
    REPO,
    UNFREE,
    EvalError,
    cli_validates,
    evaluate,
    host,
    module,
    pytestmark,  # noqa: F401  (the same skips: nix-instantiate and NIXPKGS_LIB)
    quiet,
)

# What NixOS adds to the settings: the state directory, each local backend's server and, for
# GPU backends, the driver's library path.
NIXOS_ADDED = {"state_dir"}
NIXOS_ADDED_PER_BACKEND = {"binary"}


def without_nixos_additions(desired: dict) -> dict:
    data = {k: v for k, v in json.loads(json.dumps(desired)).items() if k not in NIXOS_ADDED}
    for backend in data.get("backends", {}).values():
        for key in NIXOS_ADDED_PER_BACKEND:
            backend.pop(key, None)
        env = backend.get("environment", {})
        if env.get("LD_LIBRARY_PATH") == "/run/opengl-driver/lib":
            del env["LD_LIBRARY_PATH"]
            if not env:
                del backend["environment"]
    return data


@pytest.mark.parametrize("name", HOSTS)
def test_the_modules_desired_state_is_the_hosts_yaml_example(name: str):
    """hosts/<name>.yaml (for machines without Nix) and the NixOS host write the same desired
    state, once NixOS' own additions are taken out."""
    report, stderr = evaluate(host(name), UNFREE)
    quiet(stderr)
    from_module = validate_data(without_nixos_additions(report["desired"]), f"{name} (module)")
    example = REPO / "hosts" / f"{name}.yaml"
    from_yaml = validate_data(yaml.safe_load(example.read_text()), example.name)
    assert from_module == from_yaml


@pytest.mark.parametrize("name", HOSTS)
def test_every_key_of_a_yaml_example_passes_through_settings_unchanged(name: str, tmp_path: Path):
    """No Nix plumbing per key: the YAML example (cpu-dev's documents every schema key), given
    to `settings` as it is, comes out of the module as the same desired state, so a field
    added to the schema tomorrow needs no change under modules/."""
    example = yaml.safe_load((REPO / "hosts" / f"{name}.yaml").read_text())
    data = tmp_path / "example.json"
    data.write_text(json.dumps(example))
    report, stderr = evaluate(
        "{ ... }: { services.tensorforge = { enable = true; "
        f"settings = builtins.fromJSON (builtins.readFile {data}); }}; }}"
    )
    quiet(stderr)
    assert report["failedAssertions"] == []
    # A null is "unset" and left out; every other key and value comes through.
    assert without_nixos_additions(report["desired"]) == without_nulls(example)


def without_nulls(value):
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


def test_settings_are_written_as_given_and_unset_ones_left_to_the_schema():
    report, stderr = evaluate(
        module(
            f"imports = [ {host('cpu-dev')} ]; "
            'services.tensorforge.settings.gateway.routing.fallbacks.smollm2 = [ "other" ]; '
            "services.tensorforge.settings.backends.smollm2-cpu.quantization = null;"
        )
    )
    quiet(stderr)
    desired = report["desired"]
    assert desired["gateway"] == {
        "host": "0.0.0.0",
        "port": 8000,
        "routing": {"fallbacks": {"smollm2": ["other"]}},
    }
    backend = desired["backends"]["smollm2-cpu"]
    # No Nix copy of the schema's defaults: nothing unset appears, a null is left out.
    assert (
        "quantization" not in backend
        and "flash_attn" not in backend
        and "monitoring" not in desired
    )
    assert backend["context_size"] == 4096 and backend["binary"].endswith("/bin/llama-server")


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ('services.tensorforge.settings.gateway.port = lib.mkForce "eighty";', "gateway.port"),
        (
            "services.tensorforge.settings.backends.smollm2-cpu.context_size = lib.mkForce (-1);",
            "backends.smollm2-cpu.context_size",
        ),
        (
            "services.tensorforge.settings.backends.smollm2-cpu.contextSize = 2048;",
            "backends.smollm2-cpu.contextSize",
        ),
        (
            'services.tensorforge.settings.gateway.routing.strategy = "fastest";',
            "gateway.routing.strategy",
        ),
    ],
)
def test_bad_settings_fail_the_build_step_naming_the_field(
    setting: str, field: str, tmp_path: Path
):
    """settings is freeform JSON: the schema, run by the build step's `tensorforge validate`,
    is what refuses a wrong value or a misspelt key, naming the file and the field."""
    report, stderr = evaluate(
        "{ lib, ... }: " + module(f"imports = [ {host('cpu-dev')} ]; {setting}")
    )
    assert report["failedAssertions"] == [], "Nix repeats none of the schema's rules"
    assert "tensorforge validate --no-file-checks --config" in report["desiredBuild"]
    with pytest.raises(AssertionError) as caught:
        cli_validates(tmp_path, "bad", report["desired"])
    message = str(caught.value)
    assert f"{field}" in message and "bad.json" in message, message


def test_a_kind_nixos_has_no_server_for_is_named():
    report, _ = evaluate(
        module(
            f'imports = [ {host("cpu-dev")} ]; services.tensorforge.settings.backends.smollm2-cpu.kind = lib.mkForce "llama";'
        ).replace("{ ", "{ lib, ... }: { ", 1)
    )
    (message,) = report["failedAssertions"]
    assert message.startswith("services.tensorforge.settings.backends.smollm2-cpu.kind: 'llama'"), (
        message
    )


@pytest.mark.parametrize(
    ("key", "option"),
    [
        ('gateway.api_keys_file = "/run/secrets/keys"', "gateway.apiKeysFile"),
        ('gateway.admin_keys_file = "/run/secrets/admin"', "gateway.adminKeysFile"),
        ('monitoring.scrape_key_file = "/run/secrets/k"', "monitoring.scrapeKeyFile"),
        ('backends.smollm2-cpu.api_key_file = "/run/secrets/k"', "backends.smollm2-cpu.apiKeyFile"),
        ('state_dir = "/srv/x"', "stateDir"),
    ],
)
def test_keys_nixos_owns_are_refused_in_settings_naming_the_option(key: str, option: str):
    """A secret set as a plain setting would bypass LoadCredential (a DynamicUser cannot read
    a root-owned key), a directory would not be created: the assertion names the option."""
    report, _ = evaluate(
        module(f"imports = [ {host('cpu-dev')} ]; services.tensorforge.settings.{key};")
    )
    (message,) = report["failedAssertions"]
    assert message.startswith(
        f"services.tensorforge.settings.{key.split(' =')[0]}: set services.tensorforge.{option} instead"
    )


# -- b200Optimized on backends the host declares ------------------------------------------------
PRESET_HOST = """
services.tensorforge = {
  b200Optimized = { enable = true; systemTuning.enable = false; };
  settings = {
    models.m = { source = "hf:org/m"; };
    models.g = { source = "path:/models"; file = "m.gguf"; };
    backends.v = { kind = "vllm"; model = "m"; port = 8001; };
    backends.l = { kind = "llamacpp"; model = "g"; port = 8002; };
    backends.l2 = { kind = "llamacpp"; model = "g"; port = 8003; context_size = 8192; };
    backends.remote = { kind = "llamacpp"; model = "g"; url = "http://far:8004"; };
    backends.o = { kind = "ollama"; model = "g"; port = 11434; };
  };
};
"""


def test_b200_tuning_reaches_every_local_backend_as_a_default(tmp_path: Path):
    report, stderr = evaluate(module(PRESET_HOST))
    quiet(stderr)
    assert report["failedAssertions"] == []
    cli_validates(tmp_path, "preset", report["desired"])
    state = validate_data(report["desired"], "preset.json")
    vllm, llama, llama_8k = (state.backends[n] for n in ("v", "l", "l2"))
    assert (vllm.tensor_parallel_size, vllm.quantization, vllm.kv_cache_dtype) == (4, "fp8", "fp8")
    assert (llama.flash_attn, llama.context_size) == (True, 32768)
    # A value the host sets wins over the preset's default.
    assert (llama_8k.flash_attn, llama_8k.context_size) == (True, 8192)
    # A backend on another host, and a kind the preset does not tune, are left alone.
    assert "flash_attn" not in report["desired"]["backends"]["remote"]
    assert set(report["desired"]["backends"]["o"]) == {"kind", "model", "port", "binary"}
    assert state.monitoring.enable and sorted(state.backends) == ["l", "l2", "o", "remote", "v"]


def test_b200_monitoring_switches_off_and_tuning_stays():
    report, _ = evaluate(
        module(
            PRESET_HOST.replace(
                "systemTuning.enable = false;",
                "systemTuning.enable = false; monitoring.enable = false;",
            )
        )
    )
    state = validate_data(report["desired"], "preset.json")
    assert not state.monitoring.enable and state.backends["v"].tensor_parallel_size == 4
    assert not report["prometheus"]["enable"]


# -- configurations written for the old options --------------------------------------------------
OLD_STYLE = """{ lib, ... }: {
  networking.hostName = "old";
  services.tensorforge = {
    enable = true;
    models.m = { source = "path:/m"; file = "m.gguf"; };
    backends.b = { kind = "llamacpp"; model = "m"; port = 8080; contextSize = lib.mkForce 2048;
                   flashAttn = true; openFirewall = true; };
    gateway = { port = 9000; routing.strategy = "least-load"; openFirewall = true; };
    monitoring.listenAddress = "0.0.0.0";
  };
  services.tensorforge.settings.backends.b.context_size = 1024;
}"""


def test_old_options_keep_working_and_each_says_what_to_write_once(tmp_path: Path):
    """Scalars are mkRenamedOptionModule aliases of their settings key; a backend's old
    camelCase options are translated one by one (with their priority: the old mkForce beats a
    plain setting), each with one warning naming the key to write instead."""
    report, stderr = evaluate(OLD_STYLE)
    assert report["failedAssertions"] == []
    cli_validates(tmp_path, "old", report["desired"])
    desired = report["desired"]
    assert desired["models"] == {"m": {"source": "path:/m", "file": "m.gguf"}}
    backend = desired["backends"]["b"]
    assert (backend["kind"], backend["port"], backend["context_size"], backend["flash_attn"]) == (
        "llamacpp",
        8080,
        2048,
        True,
    )
    assert desired["gateway"] == {"port": 9000, "routing": {"strategy": "least-load"}}
    assert desired["monitoring"] == {"listen_address": "0.0.0.0"}
    assert sorted(report["firewall"]) == [8080, 9000], "the NixOS options beside them still apply"
    warnings = report["warnings"]
    renamed = {
        "services.tensorforge.models": "services.tensorforge.settings.models",
        "services.tensorforge.gateway.port": "services.tensorforge.settings.gateway.port",
        "services.tensorforge.gateway.routing.strategy": "services.tensorforge.settings.gateway.routing.strategy",
        "services.tensorforge.monitoring.listenAddress": "services.tensorforge.settings.monitoring.listen_address",
    }
    for old, new in renamed.items():
        assert sum(f"`{old}'" in w and f"renamed to `{new}'" in w for w in warnings) == 1, (
            old,
            warnings,
        )
    translated = {
        "kind": "kind",
        "model": "model",
        "port": "port",
        "contextSize": "context_size",
        "flashAttn": "flash_attn",
    }
    for old, key in translated.items():
        said = [
            w
            for w in warnings
            if w.startswith(f"services.tensorforge.backends.b.{old} is obsolete")
        ]
        assert (
            len(said) == 1
            and f"write services.tensorforge.settings.backends.b.{key} instead" in said[0]
        ), warnings
    assert len(warnings) == len(renamed) + len(translated), (
        "no warning for openFirewall, still an option"
    )
    assert "Obsolete option" not in stderr, "nothing reads the aliases"


def test_a_removed_option_says_what_to_write_instead():
    report, _ = evaluate(module('services.tensorforge = { enable = true; dataDir = "/srv/tf"; };'))
    (message,) = report["failedAssertions"]
    assert "services.tensorforge.dataDir" in message and "services.tensorforge.stateDir" in message


def test_nixos_options_for_a_backend_that_is_not_declared_are_refused():
    report, _ = evaluate(
        module(
            f"imports = [ {host('cpu-dev')} ]; services.tensorforge.backends.typo.openFirewall = true;"
        )
    )
    (message,) = report["failedAssertions"]
    assert message.startswith(
        "services.tensorforge.backends.typo: there is no services.tensorforge.settings.backends.typo"
    )


def test_settings_of_the_wrong_shape_are_refused_by_the_option_type():
    with pytest.raises(EvalError) as caught:
        evaluate(module("services.tensorforge = { enable = true; settings = [ 1 ]; };"))
    assert "services.tensorforge.settings" in str(caught.value), str(caught.value)[-600:]
