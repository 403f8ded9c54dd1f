"""The Grafana dashboards, as data: each is a list of panels with their PromQL. `write_all`
renders them to the JSON files in the repository's `monitoring/dashboards/`, which Grafana
provisions; a test keeps those files identical to what this module renders and runs every
expression through a real Prometheus.

Template variables: `$datasource`, `$host` (every dashboard) and `$backend` (per-kind ones,
declared with their kind in reconciler/backends/kinds/)."""

from __future__ import annotations

from pathlib import Path

from reconciler.backends.registry import KINDS
from reconciler.monitoring.grafana import Dashboard, Panel, rendered_files, write_files
from reconciler.monitoring.promql import RATE, H
from reconciler.monitoring.promql import quantiles as _quantiles

G = "tensorforge_gateway_"


def _ratio_or_zero(part: str, whole: str, by: str) -> str:
    """part/whole per group, 0 (not "no data") for groups with traffic but no part."""
    return f"(sum by ({by}) ({part}) or sum by ({by}) ({whole}) * 0) / sum by ({by}) ({whole})"


GATEWAY = Dashboard(
    "tensorforge-gateway",
    "TensorForge / Gateway overview",
    [
        Panel(
            "Requests per second by model",
            [(f"sum by (model) (rate({G}requests_total{{{H}}}[{RATE}]))", "{{model}}")],
            "reqps",
        ),
        Panel(
            "Error ratio (5xx) by model",
            [
                (
                    _ratio_or_zero(
                        f'rate({G}requests_total{{{H}, status=~"5.."}}[{RATE}])',
                        f"rate({G}requests_total{{{H}}}[{RATE}])",
                        "model",
                    ),
                    "{{model}}",
                )
            ],
            "percentunit",
            description="Share of requests answered with a 5xx status.",
        ),
        Panel(
            "Request latency (p50/p95/p99)",
            _quantiles(f"{G}request_duration_seconds", "model", H),
            "s",
        ),
        Panel(
            "Time to first token (p50/p95/p99)",
            _quantiles(f"{G}time_to_first_token_seconds", "model", H),
            "s",
        ),
        Panel(
            "In-flight requests by backend",
            [(f"sum by (backend) ({G}in_flight_requests{{{H}}})", "{{backend}}")],
        ),
        Panel(
            "Tokens per second by type",
            [
                (
                    f"sum by (model, type) (rate({G}tokens_total{{{H}}}[{RATE}]))",
                    "{{model}} {{type}}",
                )
            ],
            "short",
        ),
        Panel(
            "Requests per second by API-key client",
            [
                (
                    f"sum by (client, status) (rate({G}client_requests_total{{{H}}}[{RATE}]))",
                    "{{client}} {{status}}",
                )
            ],
            "reqps",
            description="Clients are the names in gateway.api_keys_file (a digest prefix when unnamed); "
            "empty while the gateway runs without keys.",
        ),
        Panel(
            "Tokens per second by API-key client",
            [
                (
                    f"sum by (client, type) (rate({G}client_tokens_total{{{H}}}[{RATE}]))",
                    "{{client}} {{type}}",
                )
            ],
            "short",
            description="Prompt and completion tokens from the backends' usage reports, per client.",
        ),
        Panel(
            "Retries per second by backend",
            [(f"sum by (backend) (rate({G}retries_total{{{H}}}[{RATE}]))", "{{backend}}")],
            "reqps",
            description="Requests re-sent to another backend after a failure (empty until one happens).",
        ),
        Panel(
            "Rejected requests per second by reason",
            [(f"sum by (reason) (rate({G}rejected_total{{{H}}}[{RATE}]))", "{{reason}}")],
            "reqps",
            description="Requests refused before reaching a backend (empty until one happens).",
        ),
        Panel(
            "Circuit open (1 = open)",
            [(f"max by (backend) ({G}circuit_open{{{H}}})", "{{backend}}")],
            max=1,
        ),
        Panel(
            "Backend healthy (gateway's view)",
            [(f"min by (backend, model) ({G}backend_healthy{{{H}}})", "{{backend}} {{model}}")],
            max=1,
        ),
    ],
)

GPUS = Dashboard(
    "tensorforge-gpus",
    "TensorForge / GPUs and VRAM",
    [
        Panel(
            "GPUs per host",
            [(f"sum by (host) (tensorforge_gpus{{{H}}})", "{{host}}")],
            kind="stat",
            width=8,
        ),
        Panel(
            "VRAM used per host",
            [(f"sum by (host) (tensorforge_gpu_memory_used_bytes{{{H}}})", "{{host}}")],
            "bytes",
            kind="stat",
            width=8,
        ),
        Panel(
            "VRAM total per host",
            [(f"sum by (host) (tensorforge_gpu_memory_total_bytes{{{H}}})", "{{host}}")],
            "bytes",
            kind="stat",
            width=8,
        ),
        Panel(
            "VRAM used per GPU",
            [(f"tensorforge_gpu_memory_used_bytes{{{H}}}", "{{host}} GPU {{index}} ({{backend}})")],
            "bytes",
        ),
        Panel(
            "VRAM used ratio per GPU",
            [
                (
                    f"tensorforge_gpu_memory_used_bytes{{{H}}} / tensorforge_gpu_memory_total_bytes{{{H}}}",
                    "{{host}} GPU {{index}} ({{backend}})",
                )
            ],
            "percentunit",
            max=1,
        ),
        Panel(
            "Utilisation per GPU",
            [(f"tensorforge_gpu_utilization_ratio{{{H}}}", "{{host}} GPU {{index}}")],
            "percentunit",
            max=1,
        ),
        Panel(
            "Temperature per GPU",
            [(f"tensorforge_gpu_temperature_celsius{{{H}}}", "{{host}} GPU {{index}}")],
            "celsius",
        ),
        Panel(
            "Power per GPU",
            [(f"tensorforge_gpu_power_watts{{{H}}}", "{{host}} GPU {{index}}")],
            "watt",
        ),
    ],
)

RECONCILER = Dashboard(
    "tensorforge-reconciler",
    "TensorForge / Reconciler and units",
    [
        Panel(
            "Converged (1 = as declared)",
            [(f"min by (host) (tensorforge_reconciler_converged{{{H}}})", "{{host}}")],
            kind="stat",
            width=8,
        ),
        Panel(
            "Seconds since last converged",
            [
                (
                    f"time() - max by (host) (tensorforge_reconciler_last_converged_timestamp_seconds{{{H}}})",
                    "{{host}}",
                )
            ],
            "s",
            kind="stat",
            width=8,
        ),
        Panel(
            "Passes and failures per second",
            [
                (
                    f"sum by (host) (rate(tensorforge_reconciler_passes_total{{{H}}}[{RATE}]))",
                    "passes {{host}}",
                ),
                (
                    f"sum by (host) (rate(tensorforge_reconciler_pass_failures_total{{{H}}}[{RATE}]))",
                    "failures {{host}}",
                ),
            ],
            "ops",
            width=8,
        ),
        Panel("Unit up", [(f"tensorforge_unit_up{{{H}}}", "{{host}} {{unit}}")], max=1),
        Panel("Unit healthy", [(f"tensorforge_unit_healthy{{{H}}}", "{{host}} {{unit}}")], max=1),
        Panel(
            "Unit restarts (last hour)",
            [(f"increase(tensorforge_unit_restarts_total{{{H}}}[1h])", "{{host}} {{unit}}")],
            width=24,
        ),
    ],
)

# Each backend kind declares its own dashboard (reconciler/backends/kinds/).
DASHBOARDS = [GATEWAY, GPUS, RECONCILER, *(k.dashboard for k in KINDS.values() if k.dashboard)]


def dashboard_files() -> dict[str, str]:
    """File name -> JSON text, exactly as committed under monitoring/dashboards/."""
    return rendered_files(DASHBOARDS)


def write_all(directory: Path) -> list[Path]:
    return write_files(DASHBOARDS, directory)
