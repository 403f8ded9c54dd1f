"""The NixOS module under nixpkgs' real module system.

tests/nix/eval-module.nix runs modules/tensorforge.nix through `lib.evalModules` from
nix-community/nixpkgs.lib (NIXPKGS_LIB, unpacked outside the repository) with a typed stand-in
for the NixOS options it writes to and fake packages. This checks what `nixos-rebuild` would
meet: failed assertions, warnings, "Obsolete option" traces, a desired.json that passes
`tensorforge validate`, the systemd services, the B200 preset, option type errors, and the
old camelCase options still working (renamed or translated to `settings`, with a warning)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.config.loader import validate_data
from tests.test_nix_contract import nix_env

REPO = Path(__file__).resolve().parent.parent
NIX = shutil.which("nix-instantiate")
NIXPKGS_LIB = os.environ.get("NIXPKGS_LIB", "")
HARNESS = REPO / "tests" / "nix" / "eval-module.nix"
HOSTS = sorted(p.parent.name for p in (REPO / "hosts").glob("*/default.nix"))

pytestmark = [
    pytest.mark.skipif(
        NIX is None,
        reason="nix-instantiate not found (Debian nix-bin; scripts/test.sh installs it)",
    ),
    pytest.mark.skipif(
        not NIXPKGS_LIB or not Path(NIXPKGS_LIB).is_dir(),
        reason="NIXPKGS_LIB unset: point it at an unpacked nix-community/nixpkgs.lib",
    ),
]

# The product page's snippet, exactly as printed there.
SNIPPET = """
services.tensorforge.b200Optimized = {
  enable = true;
  vllm.enable = true;      # tensor-parallel-size=4
  llamacpp.enable = true;  # --flash-attn, ctx=32768
  monitoring.enable = true; # Prometheus + Grafana
};
"""
# CUDA and the NVIDIA driver are unfree: a B200 user allows that in their nixpkgs config.
UNFREE = "{ allowUnfree = true; }"


class EvalError(Exception):
    pass


def evaluate(
    configuration: str, pkgs_config: str = "{ }", python_missing: str = "[ ]"
) -> tuple[dict[str, Any], str]:
    """(the harness' JSON report, Nix's stderr) for one NixOS module given as Nix source."""
    result = subprocess.run(
        [NIX or "nix-instantiate", "--eval", "--strict", "--json", "--option", "build-users-group", "",
         str(HARNESS), "--argstr", "nixpkgsLib", NIXPKGS_LIB,
         "--arg", "configuration", configuration, "--arg", "pkgsConfig", pkgs_config,
         "--arg", "pythonMissing", python_missing],
        capture_output=True, text=True, env=nix_env(), timeout=120, cwd=REPO,
    )  # fmt: skip
    if result.returncode != 0:
        raise EvalError(result.stderr)
    return json.loads(result.stdout), result.stderr


def module(body: str) -> str:
    return "{ " + body + " }"


def host(name: str) -> str:
    return str(REPO / "hosts" / name)


def quiet(stderr: str) -> None:
    """No trace and no evaluation warning: what `nixos-rebuild` would print besides the build."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert not lines, "evaluation printed:\n" + "\n".join(lines)


def cli_validates(tmp_path: Path, name: str, desired: dict) -> None:
    """`tensorforge validate` on the produced file, as the module's build step runs it."""
    cli = REPO / ".venv" / "bin" / "tensorforge"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(desired))
    command = [str(cli)] if cli.exists() else ["python", "-m", "reconciler.cli"]
    # As the build step: secrets and models are not in the Nix sandbox, so no file checks.
    result = subprocess.run([*command, "validate", "--no-file-checks", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# -- every host --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HOSTS)
def test_host_evaluates_cleanly_and_its_desired_state_validates(name: str, tmp_path: Path):
    report, stderr = evaluate(host(name), UNFREE)
    quiet(stderr)
    assert report["failedAssertions"] == [] and report["warnings"] == []
    desired = report["desired"]
    state = validate_data(desired, f"{name}.json")
    assert state.host == name
    cli_validates(tmp_path, name, desired)
    # Only schema keys: nothing NixOS-only or alias-shaped reaches the file.
    assert "address" not in desired["gateway"] and "api_key_file" not in desired["gateway"]
    for backend in desired.get("backends", {}).values():
        assert not {"package", "open_firewall"} & set(backend)
    # The build step checks the file with the reconciler's own validation.
    assert "tensorforge validate --no-file-checks --config" in report["desiredBuild"]


def test_an_old_option_name_still_works_and_says_so_once():
    """mkRenamedOptionModule: a user who really sets `gateway.address` gets the trace and the
    value; the alias is never written to desired.json."""
    report, stderr = evaluate(
        module('services.tensorforge = { enable = true; gateway.address = "10.1.2.3"; };')
    )
    said = stderr + "\n".join(report["warnings"])
    assert "services.tensorforge.gateway.address" in said and "renamed" in said
    assert report["desired"]["gateway"]["host"] == "10.1.2.3"
    assert "address" not in report["desired"]["gateway"]


def test_keys_file_reaches_the_gateway_through_its_credential_store_only():
    report, stderr = evaluate(
        module(
            f'imports = [ {host("cpu-dev")} ]; services.tensorforge.gateway.apiKeysFile = "/run/secrets/keys";'
        )
    )
    quiet(stderr)
    gateway = report["desired"]["gateway"]
    assert gateway["api_keys_file"] == "/run/credentials/tensorforge-gateway.service/api-keys"
    assert "/run/secrets/keys" not in json.dumps(report["desired"]), "the raw secret path leaked"
    credentials = report["services"]["tensorforge-gateway"]["serviceConfig"]["LoadCredential"]
    assert credentials == ["api-keys:/run/secrets/keys"]


def test_admin_keys_and_requests_reach_the_gateway_and_the_reconciler():
    """The admin API (issue 19): its keys through the gateway's credential store only, and one
    requests directory the gateway writes (its own runtime directory, kept across restarts)
    and the reconciler reads."""
    report, stderr = evaluate(
        module(
            f'imports = [ {host("cpu-dev")} ]; services.tensorforge.gateway.adminKeysFile = "/run/secrets/admin";'
        )
    )
    quiet(stderr)
    assert report["failedAssertions"] == []
    assert (
        report["desired"]["gateway"]["admin_keys_file"]
        == "/run/credentials/tensorforge-gateway.service/admin-keys"
    )
    assert "/run/secrets/admin" not in json.dumps(report["desired"]), "the raw secret path leaked"
    gateway = report["services"]["tensorforge-gateway"]
    assert gateway["serviceConfig"]["LoadCredential"] == ["admin-keys:/run/secrets/admin"]
    requests = gateway["environment"]["TF_ADMIN_REQUESTS_DIR"]
    assert requests == "/run/" + gateway["serviceConfig"]["RuntimeDirectory"]
    assert gateway["serviceConfig"]["RuntimeDirectoryPreserve"] == "yes"
    assert (
        report["services"]["tensorforge-reconciler"]["environment"]["TF_ADMIN_REQUESTS_DIR"]
        == requests
    )


# -- bad input is refused with the option's name ----------------------------------------------
@pytest.mark.parametrize(
    ("setting", "option"),
    [
        (
            'services.tensorforge.gateway.openFirewall = "yes";',
            "services.tensorforge.gateway.openFirewall",
        ),
        ("services.tensorforge.user = 5;", "services.tensorforge.user"),
        (
            'services.tensorforge.backends.smollm2-cpu.package = "llama";',
            "services.tensorforge.backends.smollm2-cpu.package",
        ),
        # Not JSON: the settings type refuses it.
        (
            "services.tensorforge.settings.gateway.host = x: x;",
            "services.tensorforge.settings.gateway.host",
        ),
    ],
)
def test_wrong_type_of_a_nixos_option_is_refused_with_its_name(setting: str, option: str):
    with pytest.raises(EvalError) as caught:
        evaluate(module(f"imports = [ {host('cpu-dev')} ]; {setting}"))
    assert f"option `{option}'" in str(caught.value) or f"option '{option}'" in str(caught.value), (
        str(caught.value)[-800:]
    )


@pytest.mark.parametrize(
    "setting",
    [
        "services.tensorforge.gateway.apiKeysFile = ./keys;",  # a path literal: copied to the store
        'services.tensorforge.gateway.apiKeysFile = "/nix/store/aaaa-keys";',
        'services.tensorforge.monitoring.scrapeKeyFile = "/nix/store/aaaa-key";',
        'services.tensorforge.gateway.adminKeysFile = "/nix/store/aaaa-admin";',
        'services.tensorforge.backends.smollm2-cpu.apiKeyFile = "relative/key";',
    ],
)
def test_secrets_in_the_store_are_refused(setting: str):
    with pytest.raises(EvalError) as caught:
        evaluate(module(f"imports = [ {host('cpu-dev')} ]; {setting}"))
    message = str(caught.value)
    assert "outside the Nix store" in message, message[-800:]
    assert setting.split(" =")[0] in message, message[-800:]


# -- the product page's snippet ------------------------------------------------------------------
def test_product_page_snippet_is_a_working_appliance(tmp_path: Path):
    report, stderr = evaluate(module(SNIPPET), UNFREE)
    quiet(stderr)
    assert report["failedAssertions"] == [] and report["warnings"] == []
    assert report["enabled"], "b200Optimized.enable alone enables the service"
    state = validate_data(report["desired"], "snippet.json")
    cli_validates(tmp_path, "snippet", report["desired"])
    vllm = [b for b in state.backends.values() if b.kind == "vllm"]
    llama = [b for b in state.backends.values() if b.kind == "llamacpp"]
    assert len(vllm) == 1 and len(llama) == 1
    assert (vllm[0].tensor_parallel_size, vllm[0].quantization, vllm[0].kv_cache_dtype) == (
        4,
        "fp8",
        "fp8",
    )
    assert (llama[0].flash_attn, llama[0].context_size) == (True, 32768)
    for backend in (*vllm, *llama):
        assert backend.model in state.models and backend.binary, backend
        assert backend.gpus_wanted >= 1
    # CUDA builds per package, not a system-wide nixpkgs.config.cudaSupport.
    assert all("-cuda/bin/" in b for b in report["backendBinaries"].values()), report[
        "backendBinaries"
    ]
    assert report["nixpkgsConfig"] == {}, "a service option must not rewrite nixpkgs.config"
    # Monitoring: Prometheus scraping every TensorForge job, Grafana with our dashboards.
    assert (
        state.monitoring.enable and report["prometheus"]["enable"] and report["grafana"]["enable"]
    )
    jobs = {j["job_name"] for j in report["prometheus"]["scrapeConfigs"]}
    assert {"tensorforge-gateway", "tensorforge-reconciler", "tensorforge-gpu"} <= jobs
    assert {f"tensorforge-backend-{n}" for n in state.backends} <= jobs
    (provider,) = report["grafana"]["dashboards"]["providers"]
    assert provider["options"]["path"].endswith("monitoring/dashboards")
    assert any(f.endswith(".rules.yml") for f in report["prometheus"]["ruleFiles"])
    # The B200 host tuning.
    nvidia = report["nvidia"]
    assert nvidia["datacenter"]["enable"] and nvidia["nvidiaPersistenced"] and nvidia["open"]
    assert nvidia["package"].startswith("<drv nvidia-x11-dc_5") and nvidia["graphics"]
    assert report["tuning"]["governor"] == "performance"
    assert {"loglevel=4", "transparent_hugepage=madvise", "iommu=pt"} <= set(
        report["tuning"]["kernelParams"]
    )
    assert {
        "tensorforge-reconciler",
        "tensorforge-gateway",
        "tensorforge-gpu-exporter",
        "grafana",
    } <= set(report["services"])


def test_snippet_values_are_defaults_a_host_overrides_one_by_one():
    report, stderr = evaluate(
        module(
            SNIPPET
            + """
            services.tensorforge.b200Optimized.vllm = { model = "mine"; extraArgs = [ "--enable-prefix-caching" ]; };
            services.tensorforge.settings.models.mine = { source = "hf:org/mine"; };
            services.tensorforge.settings.backends.b200-llamacpp.context_size = 8192;
            services.tensorforge.settings.backends.b200-vllm.quantization = null;
            powerManagement.cpuFreqGovernor = "schedutil";
            services.tensorforge.b200Optimized.systemTuning.kernelParams = [ "iommu=pt" ];
            hardware.nvidia.package = config.boot.kernelPackages.nvidiaPackages.dc_580;
            services.grafana.enable = false;
            """
        ).replace("{ ", "{ config, ... }: { ", 1),
        UNFREE,
    )
    quiet(stderr)
    assert report["failedAssertions"] == []
    state = validate_data(report["desired"], "override.json")
    vllm, llama = state.backends["b200-vllm"], state.backends["b200-llamacpp"]
    assert vllm.model == "mine" and "qwen3-235b" not in state.models
    assert vllm.extra_args == ["--enable-prefix-caching"] and vllm.quantization is None
    assert vllm.tensor_parallel_size == 4  # the rest of the preset stays
    assert llama.context_size == 8192 and llama.flash_attn is True
    assert report["tuning"]["governor"] == "schedutil"
    assert sorted(report["tuning"]["kernelParams"]) == ["iommu=pt", "loglevel=4"]
    assert report["nvidia"]["package"] == "<drv nvidia-x11-dc_580>"
    assert not report["grafana"]["enable"] and "grafana" not in report["services"]


def test_tuning_wins_over_a_generated_hardware_configuration():
    """nixos-generate-config writes `powerManagement.cpuFreqGovernor = lib.mkDefault "powersave"`."""
    report, stderr = evaluate(
        module(SNIPPET).replace(
            "{ ", '{ lib, ... }: { powerManagement.cpuFreqGovernor = lib.mkDefault "powersave"; ', 1
        ),
        UNFREE,
    )
    quiet(stderr)
    assert report["tuning"]["governor"] == "performance"


def test_unfree_is_left_to_the_user_with_a_message_that_says_what_to_set():
    report, _ = evaluate(module(SNIPPET))
    (message,) = report["failedAssertions"]
    assert (
        "nixpkgs.config.allowUnfree = true" in message and "systemTuning.enable = false" in message
    )
    assert report["nixpkgsConfig"] == {}
    report, _ = evaluate(
        module(SNIPPET + "services.tensorforge.b200Optimized.systemTuning.enable = false;")
    )
    assert report["failedAssertions"] == [] and report["nvidia"]["package"] is None


def test_hosts_that_declare_their_own_backends_get_no_preset_backends():
    report, _ = evaluate(host("b200-node"), UNFREE)
    assert sorted(report["desired"]["backends"]) == ["qwen3-a", "qwen3-b"]
    assert report["nvidia"]["datacenter"]["enable"], "b200-node still gets the host tuning"


# -- monitoring --------------------------------------------------------------------------------
MONITORED = """
services.tensorforge = {
  enable = true;
  settings = {
    models.m = { source = "path:/m"; file = "m.gguf"; };
    backends.b = { kind = "llamacpp"; model = "m"; port = 8080; };
    monitoring.enable = true;
  };
  gateway.apiKeysFile = "/run/secrets/keys";
  monitoring = { prometheus.enable = true; scrapeKeyFile = "/run/secrets/scrape"; };
};
"""


def test_a_scrape_key_makes_prometheus_check_syntax_only_and_grafana_stays_off():
    report, stderr = evaluate(module(MONITORED))
    quiet(stderr)
    assert report["failedAssertions"] == [] and report["warnings"] == []
    assert report["prometheus"]["checkConfig"] == "syntax-only"
    gateway = next(
        j for j in report["prometheus"]["scrapeConfigs"] if j["job_name"] == "tensorforge-gateway"
    )
    assert gateway["authorization"]["credentials_file"] == "/run/secrets/scrape"
    assert "grafana" not in report["services"], "Grafana's unit is only touched when Grafana is on"
    report, _ = evaluate(module(MONITORED.replace('scrapeKeyFile = "/run/secrets/scrape";', "")))
    assert report["prometheus"]["checkConfig"] is True
    assert any("scrapeKeyFile" in w for w in report["warnings"])


# -- the package ------------------------------------------------------------------------------
def test_package_takes_every_dependency_and_the_offline_test_selection():
    import tomllib

    report, stderr = evaluate(host("cpu-dev"))
    quiet(stderr)
    package = report["package"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    shipped = [*project["dependencies"], *project["optional-dependencies"]["analyze"],
               *project["optional-dependencies"]["postgres"]]  # fmt: skip
    wanted = {re.match(r"[A-Za-z0-9._-]+", d)[0].lower().replace("_", "-") for d in shipped}
    assert {d.removeprefix("python3.13-") for d in package["dependencies"]} == wanted | {"pip"}
    assert package["pythonRemoveDeps"] == [], "no dependency silently dropped"
    assert package["pythonRelaxDeps"] == ["tree-sitter-language-pack"]  # nixpkgs has 1.x
    assert package["disabledTestMarks"] == ["slow"]
    selection = package["enabledTestPaths"]
    assert selection and all((REPO / p).is_file() for p in selection), selection
    assert package["maintainers"] and report["moduleMaintainers"]


def test_a_dependency_nixpkgs_lacks_fails_evaluation_by_name():
    with pytest.raises(EvalError) as caught:
        evaluate(host("cpu-dev"), python_missing='[ "httpx-aiohttp" ]')
    message = str(caught.value)
    assert "python3Packages has no httpx-aiohttp" in message, message[-600:]


# -- the option combinations the module supports ------------------------------------------------
BASE = 'imports = [ { networking.hostName = "combo"; services.tensorforge.enable = true; services.tensorforge.settings.models.m = { source = "path:/m"; file = "m.gguf"; }; } ];'
COMBINATIONS = {
    "static-user-outside-var-lib": """
        services.tensorforge = { user = "tf"; stateDir = "/srv/tf"; modelsDir = "/srv/models";
          settings.backends.b = { kind = "llamacpp"; model = "m"; port = 8080; }; };""",
    "keyed-remote-backend-and-keys": """
        services.tensorforge = { gateway.apiKeysFile = "/run/secrets/keys";
          settings.backends.far = { kind = "vllm"; model = "m"; url = "https://far.example/v1"; };
          backends.far.apiKeyFile = "/run/secrets/far"; };""",
    "no-gateway-monitoring-on-the-lan": """
        services.tensorforge = { settings.gateway.enable = false;
          settings.backends.b = { kind = "tgi"; model = "m"; port = 8080; };
          backends.b.package = pkgs.coreutils;
          settings.monitoring = { enable = true; listen_address = "0.0.0.0"; };
          monitoring.openFirewall = true; };""",
    "b200-vllm-only": """
        services.tensorforge.b200Optimized = { enable = true; vllm.enable = true; systemTuning.enable = false; };""",
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_supported_combination_evaluates_cleanly(name: str, tmp_path: Path):
    report, stderr = evaluate("{ pkgs, ... }: { " + BASE + COMBINATIONS[name] + " }")
    quiet(stderr)
    assert report["failedAssertions"] == [] and report["warnings"] == []
    cli_validates(tmp_path, name, report["desired"])
    services = report["services"]
    if name == "static-user-outside-var-lib":
        assert report["users"]["tf"]["isSystemUser"] and report["users"]["tf"]["group"] == "tf"
        assert {"d /srv/tf 0700 tf tf - -", "d /srv/models 0750 tf tf - -"} <= set(
            report["tmpfiles"]
        )
        assert {"/srv/tf", "/srv/models"} <= set(
            services["tensorforge-reconciler"]["serviceConfig"]["ReadWritePaths"]
        )
        assert services["tensorforge-gateway"]["serviceConfig"]["User"] == "tf"
    elif name == "keyed-remote-backend-and-keys":
        credentials = services["tensorforge-gateway"]["serviceConfig"]["LoadCredential"]
        assert credentials == ["api-keys:/run/secrets/keys", "backend-key-far:/run/secrets/far"]
        assert report["desired"]["backends"]["far"]["api_key_file"].startswith("/run/credentials/")
        assert "tensorforge-reconciler" not in services, "nothing local to reconcile"
    elif name == "no-gateway-monitoring-on-the-lan":
        assert "tensorforge-gateway" not in services
        assert sorted(report["firewall"]) == [9310, 9311]
        assert (
            services["tensorforge-gpu-exporter"]["serviceConfig"]["PrivateDevices"] is False
        )  # tgi wants a GPU
    else:
        assert (
            list(report["desired"]["backends"]) == ["b200-vllm"]
            and report["nvidia"]["package"] is None
        )


def test_a_clash_only_the_schema_sees_fails_the_build_step(tmp_path: Path):
    """Two backends on one port evaluate (no Nix assertion duplicates the schema), and the
    build step's `tensorforge validate` refuses the file naming the field."""
    report, _ = evaluate(
        module(
            BASE
            + """services.tensorforge.settings.backends = { a = { kind = "llamacpp"; model = "m"; port = 8080; };
                                                           b = { kind = "llamacpp"; model = "m"; port = 8080; }; };"""
        )
    )
    assert report["failedAssertions"] == []
    with pytest.raises(AssertionError) as caught:
        cli_validates(tmp_path, "clash", report["desired"])
    assert "8080" in str(caught.value) and "backends." in str(caught.value)


def test_hosts_get_the_units_and_ports_an_admin_expects():
    cpu_dev, _ = evaluate(host("cpu-dev"))
    assert set(cpu_dev["services"]) == {"tensorforge-reconciler", "tensorforge-gateway"}
    reconciler = cpu_dev["services"]["tensorforge-reconciler"]
    gateway = cpu_dev["services"]["tensorforge-gateway"]
    assert reconciler["serviceConfig"]["ExecStart"].endswith(
        '"up" "--no-gateway" "--config" "/etc/tensorforge/desired.json"'
    )
    assert gateway["serviceConfig"]["ExecStart"].endswith(
        '"gateway" "--config" "/etc/tensorforge/desired.json"'
    )
    assert reconciler["wantedBy"] == gateway["wantedBy"] == ["multi-user.target"]
    assert "tensorforge-reconciler.service" in gateway["after"]
    assert (
        gateway["serviceConfig"]["DynamicUser"] is True
        and gateway["serviceConfig"]["PrivateDevices"] is True
    )
    assert reconciler["reloadTriggers"] and reconciler["serviceConfig"]["ExecReload"].endswith(
        "kill -HUP $MAINPID"
    )
    assert sorted(cpu_dev["firewall"]) == [
        8000,
        8080,
    ]  # gateway and the backend gateway-only reaches
    assert (
        cpu_dev["etc"]["tensorforge/desired.json"]["mode"] == "0444"
    )  # a copy: the gateway watches its mtime
    gateway_only, _ = evaluate(host("gateway-only"))
    assert set(gateway_only["services"]) == {"tensorforge-gateway"}, (
        "no local backend: no reconciler"
    )
    assert gateway_only["firewall"] == [8000]
    b200, _ = evaluate(host("b200-node"), UNFREE)
    assert {
        "tensorforge-reconciler",
        "tensorforge-gateway",
        "tensorforge-gpu-exporter",
        "grafana",
    } <= set(b200["services"])
    assert "nvidia-fabricmanager.service" in b200["services"]["tensorforge-reconciler"]["after"]
    assert sorted(b200["firewall"]) == [8000, 8001, 8002]


def test_the_module_knows_the_kinds_of_the_registry():
    """modules/lib/kinds.json (generated from reconciler/backends/registry.py) is the module's
    list of kinds: an SGLang backend (no nixpkgs package) asks for one by name and, sharded, wants
    GPUs; a kind the registry lacks is named as such, with the known ones."""
    sglang = 'services.tensorforge.settings.backends.s = { kind = "sglang"; model = "m"; port = 30000; tensor_parallel_size = 2; };'
    report, _ = evaluate(module(BASE + sglang))
    (message,) = report["failedAssertions"]
    assert "backends.s.package: nixpkgs has no sglang server; set package to one" in message
    # A Python environment with sglang, as the host would give it: its main program runs it.
    env = 'pkgs.coreutils // { meta.mainProgram = "python3"; }'
    report, stderr = evaluate(
        "{ pkgs, ... }: { "
        + BASE
        + sglang
        + f" services.tensorforge.backends.s.package = {env}; }}"
    )
    quiet(stderr)
    assert report["failedAssertions"] == []
    assert report["desired"]["backends"]["s"]["binary"].endswith("-coreutils/bin/python3")
    # Sharded: it wants GPUs, so its unit gets the driver's library path.
    assert (
        report["desired"]["backends"]["s"]["environment"]["LD_LIBRARY_PATH"]
        == "/run/opengl-driver/lib"
    )
    report, _ = evaluate(module(BASE + sglang.replace('"sglang"', '"mlx"')))
    (message,) = report["failedAssertions"]
    assert "kind: 'mlx' is not a backend kind (llamacpp, ollama, sglang, tgi, vllm)" in message
