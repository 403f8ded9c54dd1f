"""Monitoring proved against the real tools: promtool checks the generated configuration, the
alert rules and their unit tests, and a real Prometheus scrapes a running gateway, the real
llama.cpp server and both exporters, then answers every PromQL expression the dashboards and
alert rules use."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, Servers, free_port, smollm2_config

from reconciler.config.schema import DesiredState
from reconciler.gpu.inventory import GpuInfo, StaticInventory
from reconciler.monitoring import dashboards, grafana, prometheus
from reconciler.monitoring.exposition import MetricsServer
from reconciler.monitoring.gpu_exporter import gpu_registry
from reconciler.monitoring.reconciler_metrics import ReconcilerMetricsExporter, UnitSample

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
ALERTS = REPO / "monitoring" / "alerts"
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)

# Dashboards whose every panel must show data in the live test; the vLLM and TGI ones can
# only be parsed here (no such server on a CPU test host).
LIVE_DASHBOARDS = {
    "tensorforge-gateway",
    "tensorforge-gpus",
    "tensorforge-reconciler",
    "tensorforge-llamacpp",
}
# Panels that stay empty until something fails (counters without a sample yet).
EMPTY_UNTIL_FAILURE = {"Retries per second by backend", "Rejected requests per second by reason"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_rules_are_valid():
    result = promtool("check", "rules", str(ALERTS / "tensorforge.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass():
    result = promtool("test", "rules", "tensorforge.rules.test.yml", cwd=ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def grafana_to_promql(expr: str, rate_window: str = "30s") -> str:
    """What Grafana sends for an expression with 'All' selected in every variable."""
    return (
        expr.replace("$__rate_interval", rate_window)
        .replace("$host", ".*")
        .replace("$backend", ".*")
    )


def all_expressions() -> list[tuple[str, str, str]]:
    """(source, title, PromQL) for every dashboard panel query and every alert rule."""
    found = []
    for name, text in dashboards.dashboard_files().items():
        for title, expr in grafana.expressions(json.loads(text)):
            found.append((name.removesuffix(".json"), title, grafana_to_promql(expr)))
    rules = yaml.safe_load((ALERTS / "tensorforge.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            found.append(("alerts", rule["alert"], rule["expr"]))
    return found


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator:
    """Start Prometheus on a free port for a configuration file; returns its URL."""
    servers = Servers()

    def start(config: Path) -> str:
        url = f"http://127.0.0.1:{free_port()}"
        argv = [
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn",
        ]  # fmt: skip
        servers.start(argv, tmp_path / "prometheus.log", url + "/-/ready")
        return url

    yield start
    servers.stop_all()


def query(prom: str, expr: str) -> dict:
    response = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
    return body["data"]


def wait_for(prom: str, expr: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if query(prom, expr)["result"]:
            return
        time.sleep(0.25)
    raise AssertionError(f"no series for {expr} after {timeout}s")


def live_metrics_check(url: str, headers: dict | None = None) -> str:
    response = httpx.get(url, timeout=5, headers=headers)
    assert response.status_code == 200, f"{url} answered {response.status_code}: no metrics served"
    text = response.text
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"{url}: {result.stdout}{result.stderr}"
    )
    return text


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")
def test_real_prometheus_answers_every_dashboard_and_alert_query(
    llama_server: str, run_gateway, prometheus_server, tmp_path: Path
):
    started = time.monotonic()
    # The exporters run in this process, on free ports, fed with known values.
    reconciler = ReconcilerMetricsExporter(free_port())
    units = [UnitSample("backend-cpu", True, True, 1), UnitSample("gateway", True, True, 0)]
    reconciler.metrics.record_pass(True, True, units)
    gib = 1024**3
    inventory = StaticInventory(
        [
            GpuInfo(
                0, "GPU-0000", "NVIDIA B200", 192 * gib, 120 * gib, 72 * gib, 55, (10, 0), 60, 640.0
            ),
            GpuInfo(
                1, "GPU-0001", "NVIDIA B200", 192 * gib, 2 * gib, 190 * gib, 0, (10, 0), 35, 140.0
            ),
        ]
    )
    gpus = MetricsServer(gpu_registry(inventory, lambda: {0: ["cpu"]}), "127.0.0.1", free_port())
    try:
        # API keys on: /metrics needs one too, and Prometheus presents its own from a file.
        keys, scrape_key = tmp_path / "api-keys", tmp_path / "prometheus-key"
        keys.write_text("sk-client ci-client\nsk-prometheus prometheus\n")
        scrape_key.write_text("sk-prometheus\n")
        auth = {"Authorization": "Bearer sk-client"}
        config = smollm2_config(llama_server, free_port(), api_keys_file=str(keys))
        gateway = run_gateway(config)
        state = DesiredState.model_validate(
            {
                **config,
                "host": "ci-host",
                "monitoring": {
                    "enable": True,
                    "reconciler_metrics_port": reconciler.server.port,
                    "gpu_exporter_port": gpus.port,
                    "scrape_key_file": str(scrape_key),
                },
            }
        )
        out = tmp_path / "monitoring"
        prometheus.write_bundle(state, out, scrape_interval="1s")
        checked = promtool("check", "config", str(out / "prometheus.yml"))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        prom = prometheus_server(out / "prometheus.yml")

        # Traffic: plain and streaming completions, and one request for an unknown model.
        with httpx.Client(base_url=gateway, timeout=30, headers=auth) as client:
            for i in range(3):
                body = {
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": f"Count to {i + 2}."}],
                    "max_tokens": 8,
                }
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                with client.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}
                ) as r:
                    assert r.status_code == 200
                    r.read()
            missing = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=missing).status_code == 404

        # promtool accepts what the gateway and the exporters actually serve.
        assert httpx.get(gateway + "/metrics", timeout=5).status_code == 401
        gateway_text = live_metrics_check(gateway + "/metrics", headers=auth)
        assert "tensorforge_gateway_requests_total" in gateway_text
        live_metrics_check(reconciler.server.url)
        live_metrics_check(gpus.url)

        # Every target is scraped, and the traffic has reached Prometheus in two samples.
        jobs = {j["job_name"] for j in prometheus.scrape_config(state)["scrape_configs"]}
        for job in jobs:
            wait_for(prom, f'up{{job="{job}"}} == 1')
        wait_for(
            prom,
            'count_over_time(llamacpp:tokens_predicted_total{backend="cpu"}[30s]) > 1 and llamacpp:tokens_predicted_total > 0',
        )
        wait_for(prom, "count_over_time(tensorforge_gateway_requests_total[30s]) > 1")
        wait_for(prom, "count_over_time(tensorforge_unit_restarts_total[30s]) > 1")

        empty = []
        for source, title, expr in all_expressions():
            data = query(prom, expr)  # must parse and evaluate
            if (
                source in LIVE_DASHBOARDS
                and title not in EMPTY_UNTIL_FAILURE
                and not data["result"]
            ):
                empty.append(f"{source} / {title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        # Prometheus loaded all the rules and evaluates every one of them without error.
        deadline = time.monotonic() + 10
        while True:
            groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
            health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            if all(h != "unknown" for h in health.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        declared = yaml.safe_load((ALERTS / "tensorforge.rules.yml").read_text())
        names = {r["alert"] for g in declared["groups"] for r in g["rules"]}
        assert set(health) == names and set(health.values()) == {"ok"}, health
    finally:
        gpus.close()
        reconciler.close()
    assert time.monotonic() - started < 60
