"""The NixOS module's Prometheus jobs equal the ones `tensorforge monitoring-config` writes.

The dashboards and alert rules select on job names (`tensorforge-backend-<name>`, ...) and on
the target labels `host`, `backend`, `model` and `kind`. modules/monitoring.nix builds its
scrape jobs from the resolved settings with modules/lib/scrape.nix (builtins only), taking the
schema's defaults for what is unset; this evaluates that with a bare
`nix-instantiate --eval --strict --json` and compares it with
reconciler.monitoring.prometheus.scrape_config for the same desired state."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.config.loader import validate_data
from reconciler.monitoring.prometheus import scrape_config, without_metrics
from tests.test_nix_contract import nix_env

REPO = Path(__file__).resolve().parent.parent
NIX = shutil.which("nix-instantiate")
HOSTS = sorted(p.parent.name for p in (REPO / "hosts").glob("*/settings.nix"))

pytestmark = pytest.mark.skipif(
    NIX is None,
    reason="nix-instantiate not found: install Debian's nix-bin (scripts/test.sh does as root)",
)

# Every kind, a remote https backend with a path prefix and no port, a wildcard gateway, a
# backend on a wildcard address, and monitoring on.
EVERY_KIND = """{
  host = "mixed";
  models.m = { source = "hf:org/m"; };
  backends.a-llama = { kind = "llamacpp"; model = "m"; port = 8081; host = "0.0.0.0"; };
  backends.b-vllm = { kind = "vllm"; model = "m"; port = 8082; };
  backends.c-tgi = { kind = "tgi"; model = "m"; port = 8083; };
  backends.d-ollama = { kind = "ollama"; model = "m"; port = 11434; };
  backends.e-remote = { kind = "vllm"; model = "m"; url = "https://far.example/v1/"; };
  backends.f-remote-tgi = { kind = "tgi"; model = "m"; url = "http://tgi-host:3000"; };
  backends.g-sglang = { kind = "sglang"; model = "m"; port = 30000; };
  gateway = { host = "0.0.0.0"; port = 9000; };
  monitoring = { enable = true; reconciler_metrics_port = 9400; gpu_exporter_port = 9401; };
}"""

# Defaults only: gateway on, monitoring off, host "localhost".
MINIMAL = """{
  models.m = { source = "path:/m"; file = "m.gguf"; };
  backends.only = { kind = "llamacpp"; model = "m"; port = 8080; };
}"""

NO_GATEWAY = """{
  host = "quiet";
  models.m = { source = "path:/m"; file = "m.gguf"; };
  backends.only = { kind = "tgi"; model = "m"; port = 8080; };
  gateway.enable = false;
  monitoring.enable = true;
}"""

# API keys on: Prometheus presents one to scrape the gateway's /metrics.
KEYED = """{
  models.m = { source = "path:/m"; file = "m.gguf"; };
  backends.only = { kind = "llamacpp"; model = "m"; port = 8080; };
  gateway.api_keys_file = "/run/credentials/tensorforge-gateway.service/api-keys";
  monitoring = { enable = true; scrape_key_file = "@KEY@"; };
}"""


# IPv6 listeners (bracketed in targets) and exporters on a routable address.
IPV6_AND_LISTEN = """{
  models.m = { source = "path:/m"; file = "m.gguf"; };
  backends.v6 = { kind = "llamacpp"; model = "m"; port = 8080; host = "::1"; };
  gateway = { host = "::1"; port = 9000; };
  monitoring = { enable = true; listen_address = "10.0.0.5"; };
}"""


def nix_eval(expr: str) -> Any:
    result = subprocess.run(
        [NIX or "nix-instantiate", "--eval", "--strict", "--json", "--store", "dummy://",
         "--option", "restrict-eval", "true", "-I", f"tensorforge={REPO}",
         "--expr", f"let lib = import <tensorforge/modules/lib>; in {expr}"],
        capture_output=True, text=True, env=nix_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def both_sides(settings: str) -> tuple[list[dict], list[dict], Any]:
    """(Nix jobs, Python jobs, the validated state) for one host's settings."""
    out = nix_eval(
        f"let desired = lib.evalHost ({settings}); in "
        "{ inherit desired; jobs = lib.scrapeConfigs desired; skipped = lib.withoutMetrics desired; }"
    )
    state = validate_data(out["desired"], "settings.json")
    assert out["skipped"] == without_metrics(state)
    return out["jobs"], scrape_config(state)["scrape_configs"], state


def host_settings(name: str) -> str:
    return f"import {REPO / 'hosts' / name / 'settings.nix'}"


@pytest.mark.parametrize(
    "settings",
    [
        *(host_settings(h) for h in HOSTS),
        EVERY_KIND,
        MINIMAL,
        NO_GATEWAY,
        KEYED.replace("@KEY@", "/run/secrets/prometheus-key"),
        IPV6_AND_LISTEN,
    ],
    ids=[*HOSTS, "every-kind", "minimal", "no-gateway", "keyed", "ipv6-and-listen"],
)
def test_nix_scrape_jobs_equal_the_python_ones(settings: str):
    nix_jobs, python_jobs, _ = both_sides(settings)
    assert [j["job_name"] for j in nix_jobs] == [j["job_name"] for j in python_jobs]
    assert nix_jobs == python_jobs


def test_every_kind_host_has_the_labels_dashboards_select_on():
    jobs, _, state = both_sides(EVERY_KIND)
    by_name = {j["job_name"]: j for j in jobs}
    assert set(by_name) == {
        "tensorforge-gateway",
        "tensorforge-reconciler",
        "tensorforge-gpu",
        "tensorforge-backend-a-llama",
        "tensorforge-backend-b-vllm",
        "tensorforge-backend-c-tgi",
        "tensorforge-backend-e-remote",
        "tensorforge-backend-f-remote-tgi",
        "tensorforge-backend-g-sglang",
    }, "Ollama has no /metrics: no job"
    for job in jobs:
        (static,) = job["static_configs"]
        assert static["labels"]["host"] == "mixed"
        if job["job_name"].startswith("tensorforge-backend-"):
            name = job["job_name"].removeprefix("tensorforge-backend-")
            backend = state.backends[name]
            assert static["labels"] == {
                "host": "mixed", "backend": name, "model": backend.model, "kind": backend.kind
            }  # fmt: skip
    remote = by_name["tensorforge-backend-e-remote"]
    assert (remote["scheme"], remote["metrics_path"]) == ("https", "/v1/metrics")
    assert remote["static_configs"][0]["targets"] == ["far.example"]
    assert by_name["tensorforge-gateway"]["static_configs"][0]["targets"] == ["127.0.0.1:9000"]
    assert by_name["tensorforge-gpu"]["static_configs"][0]["targets"] == ["127.0.0.1:9401"]


def test_job_names_match_what_the_alerts_and_dashboards_select():
    """The rules and dashboards name jobs by these exact strings or the backend prefix."""
    rules = (REPO / "monitoring" / "alerts" / "tensorforge.rules.yml").read_text()
    dashboards = " ".join(
        p.read_text() for p in (REPO / "monitoring" / "dashboards").glob("*.json")
    )
    jobs, _, _ = both_sides(EVERY_KIND)
    names = {j["job_name"] for j in jobs}
    used = set(re.findall(r'job=~?\\?"(tensorforge-[a-z-]+)', rules + dashboards))
    assert {"tensorforge-reconciler", "tensorforge-backend-"} <= used
    for selected in used:
        assert selected in names or any(n.startswith(selected) for n in names), selected


def test_the_module_takes_its_jobs_from_lib():
    """modules/monitoring.nix must not grow its own job list again."""
    text = (REPO / "modules" / "monitoring.nix").read_text()
    assert "tfLib.scrapeConfigs" in text
    assert "tensorforge-llamacpp" not in text and "tensorforge-vllm" not in text
    assert "tensorforge-gpu-exporter" in text, "the GPU exporter service"
    assert "dashboards.settings.providers" in text, "Grafana dashboard provisioning"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_nix_jobs(tmp_path: Path):
    import yaml

    jobs, _, _ = both_sides(EVERY_KIND)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "15s"}, "scrape_configs": jobs})
    )
    result = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_keyed_gateway_is_scraped_with_the_key_file(tmp_path: Path):
    import yaml

    key = tmp_path / "prometheus-key"
    key.write_text("sk-scrape\n")
    jobs, _, state = both_sides(KEYED.replace("@KEY@", str(key)))
    gateway = next(j for j in jobs if j["job_name"] == "tensorforge-gateway")
    assert gateway["authorization"] == {"type": "Bearer", "credentials_file": str(key)}
    assert all(
        "authorization" not in j for j in jobs if j is not gateway
    )  # the key goes nowhere else
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "15s"}, "scrape_configs": jobs})
    )
    result = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    key.unlink()  # promtool checks that the file is there
    assert (
        subprocess.run(["promtool", "check", "config", str(config)], capture_output=True).returncode
        != 0
    )


def test_ipv6_targets_are_bracketed_and_exporters_scraped_where_they_listen():
    jobs, _, _ = both_sides(IPV6_AND_LISTEN)
    targets = {j["job_name"]: j["static_configs"][0]["targets"][0] for j in jobs}
    assert targets["tensorforge-gateway"] == "[::1]:9000"
    assert targets["tensorforge-backend-v6"] == "[::1]:8080"
    assert targets["tensorforge-reconciler"] == "10.0.0.5:9310"
    assert targets["tensorforge-gpu"] == "10.0.0.5:9311"
