"""The reconciler's own metrics: how many passes ran and failed, whether the last pass found
the host converged, and per unit whether it runs, answers healthy, and how often it restarted.

The values are snapshots taken after each pass (`observe_pass`), not live reads at scrape
time: a scrape never races a pass half-way through, and never calls into a driver."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler.monitoring.exposition import MetricsServer
from reconciler.plan import Action
from reconciler.status import UnitView

log = logging.getLogger(__name__)

# Actions that mean "the host is not yet what was declared".
_UNSETTLED = {
    "start",
    "restart",
    "stop",
    "wait",
    "refuse",
    "drain",
    "undrain",
    "pull",
    "rollback",
    "fail",
}


class PassSource(Protocol):
    """What a pass leaves for metrics to read (the controller; metrics never import it)."""

    last_actions: list[Action]

    def views(self) -> list[UnitView]: ...


@dataclass(frozen=True)
class UnitSample:
    unit: str
    up: bool
    healthy: bool
    restarts: int


@dataclass
class _Snapshot:
    passes: int = 0
    failures: int = 0
    converged: bool = False
    config_refused: bool = False
    last_converged: float = 0.0
    units: list[UnitSample] = field(default_factory=list)


def unit_samples(views: Iterable[UnitView]) -> list[UnitSample]:
    """Running = the driver knows a process, or the unit answers at all (systemd may not
    report a pid); healthy = its health probe said so."""
    return [
        UnitSample(
            unit=v.unit,
            up=v.pid is not None or v.health in ("healthy", "loading", "unhealthy"),
            healthy=v.health == "healthy",
            restarts=v.restarts,
        )
        for v in views
    ]


class ReconcilerMetrics(Collector):
    """A collector holding the latest snapshot; register it in a registry of your own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = _Snapshot()

    def record_pass(
        self, ok: bool, converged: bool, units: list[UnitSample], now: float | None = None,
        config_refused: bool = False,
    ) -> None:  # fmt: skip
        with self._lock:
            s = self._snapshot
            s.passes += 1
            s.config_refused = config_refused
            if not ok:
                s.failures += 1
            s.converged = ok and converged
            if s.converged:
                s.last_converged = time.time() if now is None else now
            if ok:  # a failed pass observed nothing new: keep the last good unit view
                s.units = list(units)

    def observe_pass(self, controller: PassSource, ok: bool) -> None:
        """Record one pass of `controller` (after `reconcile_once`, successful or not)."""
        units = unit_samples(controller.views()) if ok else []
        settled = not any(a.kind.value in _UNSETTLED for a in controller.last_actions)
        refused = bool(getattr(controller, "config_error", None))
        converged = settled and all(u.healthy for u in units) and not refused
        self.record_pass(ok, converged, units, config_refused=refused)

    def collect(self) -> Iterator:
        with self._lock:
            s = self._snapshot
            units = list(s.units)
            passes, failures, converged, last = s.passes, s.failures, s.converged, s.last_converged
            refused = s.config_refused
        yield CounterMetricFamily(
            "tensorforge_reconciler_passes",
            "Reconcile passes run, failed ones included.",
            value=passes,
        )
        yield CounterMetricFamily(
            "tensorforge_reconciler_pass_failures",
            "Reconcile passes that raised an error.",
            value=failures,
        )
        yield GaugeMetricFamily(
            "tensorforge_reconciler_converged",
            "1 if the last pass found every unit as declared and healthy, else 0.",
            value=1 if converged else 0,
        )
        yield GaugeMetricFamily(
            "tensorforge_reconciler_last_converged_timestamp_seconds",
            "Unix time of the last pass that found the host converged (0: never).",
            value=last,
        )
        yield GaugeMetricFamily(
            "tensorforge_reconciler_config_refused",
            "1 while the desired-state file is refused (empty, truncated or invalid) and the "
            "last good state stays in force, else 0.",
            value=1 if refused else 0,
        )
        up = GaugeMetricFamily(
            "tensorforge_unit_up", "1 if the unit's process runs.", labels=["unit"]
        )
        healthy = GaugeMetricFamily(
            "tensorforge_unit_healthy", "1 if the unit's health probe passes.", labels=["unit"]
        )
        restarts = CounterMetricFamily(
            "tensorforge_unit_restarts",
            "Restarts of the unit recorded by its driver.",
            labels=["unit"],
        )
        for u in units:
            up.add_metric([u.unit], 1 if u.up else 0)
            healthy.add_metric([u.unit], 1 if u.healthy else 0)
            restarts.add_metric([u.unit], u.restarts)
        yield from (up, healthy, restarts)


class ReconcilerMetricsExporter:
    """The collector in its own registry, served on host:port."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.metrics = ReconcilerMetrics()
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        self.server = MetricsServer(self.registry, host, port)

    def observe_pass(self, controller: PassSource, ok: bool) -> None:
        try:
            self.metrics.observe_pass(controller, ok)
        except Exception:  # metrics must never stop supervision
            log.exception("recording reconciler metrics failed")

    def close(self) -> None:
        self.server.close()
