"""PromQL pieces the dashboards share (reconciler/monitoring/dashboards.py and each backend
kind's own dashboard in reconciler/backends/kinds/)."""

from __future__ import annotations

RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals
H = 'host=~"$host"'
HB = 'host=~"$host", backend=~"$backend"'


def quantile(p: float, metric: str, by: str, sel: str) -> tuple[str, str]:
    expr = f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[{RATE}])))"
    legend = "p" + f"{p * 100:g}" + " {{" + by.split(", ")[-1] + "}}"
    return expr, legend


def quantiles(metric: str, by: str, sel: str) -> list[tuple[str, str]]:
    """p50, p95 and p99 of a histogram, one line per `by` group."""
    return [quantile(p, metric, by, sel) for p in (0.5, 0.95, 0.99)]
