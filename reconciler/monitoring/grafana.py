"""Grafana dashboard JSON from a compact description: panels with their PromQL, laid out
left to right in a 24-column grid, with `$datasource`, `$host` and (per backend kind)
`$backend` template variables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    title: str
    queries: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 12
    max: float | None = None


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: list[Panel]
    backend_kind: str | None = None  # adds a $backend variable over this kind's backends
    tags: list[str] = field(default_factory=lambda: ["tensorforge"])


def _variables(dashboard: Dashboard) -> list[dict]:
    ds = {"type": "prometheus", "uid": "${datasource}"}

    def query_var(name: str, query: str) -> dict:
        return {
            "name": name, "label": name, "type": "query", "datasource": ds,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1,
        }  # fmt: skip

    variables = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
        query_var("host", 'label_values(up{job=~"tensorforge-.+"}, host)'),
    ]
    if dashboard.backend_kind:
        variables.append(
            query_var(
                "backend",
                f'label_values(up{{kind="{dashboard.backend_kind}", host=~"$host"}}, backend)',
            )
        )
    return variables


def render(dashboard: Dashboard) -> dict:
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    x = y = row_height = 0
    for number, panel in enumerate(dashboard.panels, start=1):
        height = 4 if panel.kind == "stat" else 8
        if x + panel.width > 24:
            x, y = 0, y + row_height
            row_height = 0
        defaults: dict = {"unit": panel.unit}
        if panel.max is not None:
            defaults.update(min=0, max=panel.max)
        panels.append(
            {
                "id": number,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": ds,
                "gridPos": {"x": x, "y": y, "w": panel.width, "h": height},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                if panel.kind == "timeseries"
                else {},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": ds,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for i, (expr, legend) in enumerate(panel.queries)
                ],
            }
        )
        x += panel.width
        row_height = max(row_height, height)
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "tags": dashboard.tags,
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables(dashboard)},
        "annotations": {"list": []},
        "panels": panels,
    }


def rendered_files(dashboards: list[Dashboard]) -> dict[str, str]:
    """File name -> JSON text."""
    return {f"{d.uid}.json": json.dumps(render(d), indent=2) + "\n" for d in dashboards}


def write_files(dashboards: list[Dashboard], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered_files(dashboards).items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def expressions(dashboard_json: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in a rendered dashboard."""
    return [(p["title"], t["expr"]) for p in dashboard_json["panels"] for t in p.get("targets", [])]
